"""Run the benchmark suite and write its report: `python -m vggbench.bench [--quick] --out DIR`.

Runs `pytest benchmarks/ --benchmark-json DIR/benchmark.json` (in this process), then writes
DIR/report.md and the PNG charts next to the JSON. The exit status is pytest's (1 when a
quick-mode correctness check failed; the report is written all the same).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

from vggbench.bench import charts, markdown, results
from vggbench.checkpoint import TMP_SUFFIX, WriteError, atomic_write_text, check_writable_dir

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vggbench.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="quick mode: few small shapes, 3 rounds, errors asserted (CI); default: full mode")
    parser.add_argument("--out", type=Path, default=Path("bench-output"),
                        help="output directory (default: bench-output)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to benchmark (default: cpu)")
    parser.add_argument("-k", dest="keyword", metavar="EXPR",
                        help="pytest -k expression selecting benchmarks by id, e.g. 'N100 and H32 and float32'")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile implementation")
    parser.add_argument("--l2-flush", action="store_true",
                        help="with --device cuda: flush the GPU's L2 cache before every timed round")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the suite, write benchmark.json, report.md and charts into --out; return pytest's exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine (torch "
                     f"{torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu")
    if args.l2_flush and args.device != "cuda":
        parser.error("--l2-flush flushes a GPU's L2 cache between rounds: use it with --device cuda")
    if not (BENCHMARKS / "conftest.py").is_file():
        parser.error(f"the benchmark suite is not at {BENCHMARKS}: run from a source checkout of vggbench")
    try:
        check_writable_dir(args.out, "--out")
    except WriteError as err:
        parser.error(str(err))
    json_path = args.out / "benchmark.json"
    json_path.unlink(missing_ok=True)
    # pytest-benchmark writes the JSON in place: written beside it and renamed, a killed run leaves no half file
    partial_json = args.out / f".benchmark.json{TMP_SUFFIX}"
    pytest_args = [str(BENCHMARKS), "--benchmark-json", str(partial_json), "--bench-device", args.device,
                   "--benchmark-sort", "name"]
    pytest_args += ["--bench-quick"] * args.quick + ["--bench-no-compile"] * args.no_compile
    pytest_args += ["--bench-l2-flush"] * args.l2_flush
    if args.keyword:
        pytest_args += ["-k", args.keyword]
    print("pytest " + " ".join(pytest_args), flush=True)
    status = int(pytest.main(pytest_args))
    if partial_json.is_file():
        partial_json.replace(json_path)
    if not json_path.is_file():
        why = {pytest.ExitCode.NO_TESTS_COLLECTED: f"-k {args.keyword!r} selects no benchmark",
               pytest.ExitCode.USAGE_ERROR: "pytest refused its arguments: its error is above"}.get(
                   status, f"pytest exit status {status}")
        print(f"no benchmark ran ({why}): nothing to report", file=sys.stderr)
        return status or 1
    run = results.load(json_path)
    written = charts.write_charts(run, args.out)
    atomic_write_text(args.out / "report.md", markdown.render(run, written))
    print(f"wrote {json_path}, {args.out / 'report.md'} and {', '.join(written) or 'no charts'} in {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
