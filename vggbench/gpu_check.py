"""One command that checks the CUDA path on any machine with an NVIDIA GPU.

`bash scripts/gpu_check.sh OUT_DIR` (this module: `python -m vggbench.gpu_check OUT_DIR`)
builds the extension in place for the local GPU's architecture only, against the torch
already installed (it downloads nothing, and needs neither submitit nor a pip install),
then runs, each under its share of an overall time budget:

  build       setup.py build_ext --inplace, TORCH_CUDA_ARCH_LIST = this GPU's capability
  cuda-tests  the tests marked `cuda` (pytest -m cuda)
  memcheck    compute-sanitizer --tool memcheck on a small fused training step (if the tool exists)
  racecheck   compute-sanitizer --tool racecheck on the same step
  bench       the GPU benchmark slice (python -m vggbench.bench --device cuda -k ...): the 32->32
              units and the model steps at batch 100, eager, fused and replayed from CUDA graphs
  launch      python -m vggbench.launch --gpus 1 (NCCL), 1 epoch of VGG08 BN+RC on synthetic data
  graphs      python -m vggbench.train --cuda-graphs, 2 epochs of fused VGG08 BN+RC (bf16) on synthetic
              data through the command line: DataLoader workers pinning memory while a step is
              captured, a capture again for epoch 2's learning rate, checkpoints between replays

and writes OUT_DIR/gpu-check.json and gpu-check.md (every step's command, status, time and
the tail of its log; the logs themselves in OUT_DIR/logs/; the GPU targets against the
benchmark slice's figures). Exit status 0 only when every
step passed; without a visible GPU it says so, writes the two files, and exits with 3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vggbench import nvidia_smi

ROOT = Path(__file__).resolve().parents[1]
NO_GPU_STATUS = 3
BUDGET_S = 470  # the whole check, build included, fits in 8 minutes on one H100/H200
BENCH_SLICE = "(N100 and H32 and channels_last and (conv or res)) or step"
# one short fused training step: what compute-sanitizer watches (memory errors, shared-memory races)
SANITIZED_STEP = """
import torch, torch.nn.functional as F
from vggbench.models import build_model
torch.manual_seed(0)
model = build_model("vgg08", "bn_rc", filters=16, impl="fused", residual_reduction=True)
model = model.cuda().to(memory_format=torch.channels_last)
optimizer = torch.optim.Adam(model.parameters())
images = torch.randn(4, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
labels = torch.randint(0, 100, (4,), device="cuda")
for _ in range(2):
    with torch.autocast("cuda", torch.bfloat16):
        loss = F.cross_entropy(model(images).float(), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
model.eval()
with torch.no_grad():
    model(images)
torch.cuda.synchronize()
print("fused step ok")
"""


@dataclass
class Step:
    """One check: its command, what it needs, and (once run) how it went."""

    name: str
    command: list[str]
    cap_s: int  # at most this long, and never past the overall budget
    env: dict[str, str] = field(default_factory=dict)
    status: str = "not run"  # passed, failed, timed out, skipped, not run
    returncode: int | None = None
    seconds: float = 0.0
    log: str = ""
    tail: str = ""


def gpu_facts(python: str) -> dict[str, object] | None:
    """The GPU and software torch sees (via `python`), or None without a visible CUDA GPU."""
    probe = (
        "import json, torch\n"
        "if not torch.cuda.is_available(): print('null'); raise SystemExit\n"
        "p = torch.cuda.get_device_properties(0)\n"
        "print(json.dumps({'gpu': p.name, 'capability': f'{p.major}.{p.minor}', 'gpus': torch.cuda.device_count(),"
        " 'memory_gib': round(p.total_memory / 2**30, 1), 'torch': torch.__version__, 'cuda': torch.version.cuda,"
        " 'cudnn': torch.backends.cudnn.version(), 'uuid': str(getattr(p, 'uuid', '')) or None}))\n"
    )
    run = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise SystemExit(f"gpu_check: {python} cannot import torch:\n{run.stderr[-2000:]}")
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    if facts is not None and shutil.which("nvidia-smi"):
        smi = nvidia_smi.query(("driver_version", "clocks.max.sm", "clocks.max.mem"), facts["uuid"])
        facts["driver_and_max_clocks"] = ", ".join(smi.values()) if smi else "unknown"
    return facts


def plan(python: str, out: Path, capability: str) -> list[Step]:
    """The checks, in order."""
    sanitizer = shutil.which("compute-sanitizer")
    build_env = {"TORCH_CUDA_ARCH_LIST": capability, "VGGBENCH_FORCE_CUDA": "1",
                 "MAX_JOBS": str(os.cpu_count() or 2)}
    steps = [
        Step("build", [python, "setup.py", "build_ext", "--inplace"], 240, build_env),
        Step("cuda-tests", [python, "-m", "pytest", "tests", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                            "--continue-on-collection-errors", f"--junitxml={out / 'cuda-tests.xml'}"], 180),
    ]
    for tool in ("memcheck", "racecheck"):
        command = [sanitizer or "compute-sanitizer", "--tool", tool, "--error-exitcode", "9",
                   python, "-c", SANITIZED_STEP]
        steps.append(Step(tool, command, 90, status="not run" if sanitizer else "skipped"))
    steps += [
        Step("bench", [python, "-m", "vggbench.bench", "--device", "cuda", "--no-compile", "-k", BENCH_SLICE,
                       "--out", str(out / "bench")], 150),
        Step("launch", [python, "-m", "vggbench.launch", "--gpus", "1", "--model", "vgg08", "--variant", "bn_rc",
                        "--impl", "fused", "--dataset", "synthetic", "--epochs", "1", "--workers", "0",
                        "--no-progress", "--out-dir", str(out / "launch-run")], 90),
        Step("graphs", [python, "-m", "vggbench.train", "--model", "vgg08", "--variant", "bn_rc", "--impl", "fused",
                        "--precision", "bf16", "--channels-last", "--device", "cuda", "--cuda-graphs", "--dataset",
                        "synthetic", "--epochs", "2", "--workers", "2", "--no-progress",
                        "--out-dir", str(out / "graphs-run")], 60),
    ]
    return steps


def run_step(step: Step, logs: Path, deadline: float) -> None:
    """Run one step with its output in logs/NAME.log, within its cap and the overall deadline."""
    if step.status == "skipped":
        step.tail = "compute-sanitizer is not on PATH"
        return
    limit = min(step.cap_s, deadline - time.monotonic())
    if limit < 5:
        step.status, step.tail = "not run", "the overall time budget was spent"
        return
    log = logs / f"{step.name}.log"
    step.log = str(log)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **step.env}
    start = time.monotonic()
    print(f"gpu_check: {step.name}: {' '.join(step.command)[:200]}", flush=True)
    with log.open("w") as sink:
        try:
            done = subprocess.run(step.command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                  timeout=limit, check=False)
            step.returncode = done.returncode
            step.status = "passed" if done.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            step.status = "timed out"
    step.seconds = round(time.monotonic() - start, 1)
    step.tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    print(f"gpu_check: {step.name}: {step.status} in {step.seconds} s", flush=True)


def render_markdown(report: dict) -> str:
    """gpu-check.md: the machine, then one row per step and the tail of each log that did not pass."""
    lines = ["# vggbench GPU check", "", f"Verdict: **{report['verdict']}**", ""]
    lines += [f"- {key}: {value}" for key, value in report["machine"].items()]
    if not report["steps"]:
        return "\n".join([*lines, "", "No step ran: no CUDA GPU is visible on this machine."]) + "\n"
    lines += ["", "| step | status | seconds | exit status |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['returncode']} |" for s in report["steps"]]
    for step in report["steps"]:
        if step["status"] not in ("passed", "skipped") and step["tail"]:
            lines += ["", f"## {step['name']}: {step['status']}", "", "```", step["tail"], "```"]
    bench = Path(report["out_dir"]) / "bench" / "report.md"
    if bench.is_file():
        lines += ["", *gpu_targets(bench.read_text()), f"The benchmark slice's report: {bench}"]
    return "\n".join(lines) + "\n"


def gpu_targets(bench_report: str) -> list[str]:
    """The "## GPU targets" section of the benchmark slice's report.md (vggbench.bench.markdown checks
    them against the slice's figures), up to the next section; none when it has no such section."""
    lines = bench_report.splitlines()
    if "## GPU targets" not in lines:
        return []
    start = lines.index("## GPU targets")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def write_report(out: Path, machine: dict, steps: list[Step], verdict: str) -> None:
    """gpu-check.json and gpu-check.md in `out`."""
    report = {"verdict": verdict, "out_dir": str(out), "machine": machine, "steps": [asdict(s) for s in steps]}
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu-check.md").write_text(render_markdown(report))


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="bash scripts/gpu_check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="where gpu-check.json, gpu-check.md and the logs go")
    parser.add_argument("--python", default=sys.executable,
                        help="the Python whose torch builds and runs everything (default: this one)")
    args = parser.parse_args(argv)
    out = args.out_dir.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    machine: dict[str, object] = {"host": platform.node(), "python": args.python}
    facts = gpu_facts(args.python)
    if facts is None:
        print("gpu_check: no CUDA GPU is visible here (torch.cuda.is_available() is False): nothing to check. "
              "Run it on a machine with an NVIDIA GPU.", file=sys.stderr)
        write_report(out, machine, [], "no GPU")
        return NO_GPU_STATUS
    machine |= facts
    deadline = time.monotonic() + BUDGET_S
    steps = plan(args.python, out, str(facts["capability"]))
    for step in steps:
        run_step(step, out / "logs", deadline)
        if step.name == "build" and step.status != "passed":
            break  # nothing else can run without the extension
    verdict = "passed" if all(s.status in ("passed", "skipped") for s in steps) else "failed"
    write_report(out, machine, steps, verdict)
    print(f"gpu_check: {verdict}; wrote {out / 'gpu-check.json'} and {out / 'gpu-check.md'}", flush=True)
    return 0 if verdict == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
