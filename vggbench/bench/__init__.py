"""The benchmark suite's library and its report command (`python -m vggbench.bench`).

The benchmarks themselves are pytest-benchmark tests in `benchmarks/` (run them with
`pytest benchmarks/ --benchmark-json out.json`); this package holds what they are built
from and what turns their JSON into a report:

  layers.py   layer-level cases: one conv -> BN -> (+residual) -> LeakyReLU unit, three
              implementations, errors and saved bytes
  models.py   model-level cases: a training step of VGG08 / VGG38 BN / VGG38 BN+RC
  timing.py   rounds, device synchronisation, baselines timed interleaved for the speedups
  machine.py  machine and software information
  results.py  the benchmark JSON read back as records
  report.py   report.md;  charts.py  the PNG charts;  __main__.py  the command
"""
