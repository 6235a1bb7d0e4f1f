"""The benchmark suite's library and its report command (`python -m vggbench.bench`).

The benchmarks themselves are pytest-benchmark tests in `benchmarks/` (run them with
`pytest benchmarks/ --benchmark-json out.json`); this package holds what they are built
from and what turns their JSON into a report:

  layer_cases.py  layer-level cases: one conv -> BN -> (+residual) -> LeakyReLU unit, three
                  implementations, errors and saved bytes
  model_cases.py  model-level cases: a training step of VGG08 / VGG38 BN / VGG38 BN+RC (and the
                  landscape probe's cost on VGG38 BN+RC)
  flow_cases.py   gradient-flow equivalence: native vs fused vs float64 over 20+ training steps
  surface_cases.py  a loss surface (vggbench.landscape) on 1 vs 2 gloo ranks
  scaling.py      how cost grows: a training step against depth, batch size and threads
  op_counts.py    the ops a step dispatches that do work (torch.profiler), per unit and phase
  timing.py       rounds, the clock per device (CUDA events on a GPU), baselines timed interleaved
  machine.py      machine and software information
  results.py      the benchmark JSON read back as records
  markdown.py     report.md;  charts.py  the PNG charts;  __main__.py  the command
"""
