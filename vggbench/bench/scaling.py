"""How a training step's cost grows: step time against batch size, threads and depth, native
vs fused, on the CPU: `python -m vggbench.bench.scaling --out DIR`.

For every (model, batch size, thread count) both implementations train from the same initial
state on the same random channels_last float32 batch (forward, cross-entropy, backward, Adam,
as vggbench.train does). Rounds alternate native and fused, so each fused/native ratio pairs
steps taken seconds apart on the same machine; the median step time per implementation is
reported. Writes DIR/scaling.json (the machine, its instruction sets and every step time),
DIR/scaling.md (a table) and DIR/scaling.png (step time vs batch size, one panel per thread
count). Timings on a shared machine drift: compare the ratios, within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vggbench.bench.machine import cpu_model
from vggbench.models import build_model, model_label

IMPLS = ("native", "fused")


@dataclass(frozen=True)
class Point:
    """The median training-step time (ms) of both implementations for one configuration."""

    model: str
    batch_size: int
    threads: int
    native_ms: float
    fused_ms: float

    @property
    def ratio(self) -> float:
        """fused / native (< 1: the fused op is faster)."""
        return self.fused_ms / self.native_ms


def instruction_sets(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, object]:
    """What decides the kernels: the CPU's vector extensions (Linux), ATen's capability and
    the Winograd kernels' path (VGGBENCH_CPU_ISA may narrow it)."""
    flags: set[str] = set()
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    from vggbench import ops  # noqa: F401  (loads the extension: torch.ops.vggbench.*)

    vector = sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
    return {"cpu_flags": vector, "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "winograd_isa": torch.ops.vggbench.winograd_isa()}


class StepPair:
    """Native and fused copies of one model with one batch; `step(impl)` trains one step."""

    def __init__(self, model: str, variant: str, batch_size: int) -> None:
        seed = zlib.crc32(f"{model}-{variant}-{batch_size}".encode())
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(batch_size, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
        self.targets = torch.randint(0, 100, (batch_size,), generator=gen)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = build_model(model, variant).state_dict()
        self.steps: dict[str, Callable[[], None]] = {}
        for impl in IMPLS:
            net = build_model(model, variant, impl=impl)
            net.load_state_dict(state)
            self.steps[impl] = self._step_fn(net.to(memory_format=torch.channels_last).train())

    def _step_fn(self, net: torch.nn.Module) -> Callable[[], None]:
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

        def step() -> None:
            loss = F.cross_entropy(net(self.images), self.targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    def time_ms(self, impl: str) -> float:
        start = time.perf_counter()
        self.steps[impl]()
        return (time.perf_counter() - start) * 1e3


def measure(model: str, variant: str, batch_size: int, threads: int, rounds: int, warmup: int) -> Point:
    """Median step times over `rounds` rounds (each: one native step, one fused step) after
    `warmup` untimed rounds, on `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pair = StepPair(model, variant, batch_size)
        times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
        for round_ in range(warmup + rounds):
            for impl in IMPLS:
                elapsed = pair.time_ms(impl)
                if round_ >= warmup:
                    times[impl].append(elapsed)
    finally:
        torch.set_num_threads(before)
    return Point(model, batch_size, threads, statistics.median(times["native"]), statistics.median(times["fused"]))


def render_table(points: list[Point], variant: str, machine: dict[str, object]) -> str:
    """Markdown: the machine, then one row per configuration."""
    lines = [f"# Training-step time vs batch size, threads and depth ({variant}, float32, channels_last, CPU)", "",
             f"CPU: {machine['cpu_model']}; vector extensions: {' '.join(machine['cpu_flags']) or 'unknown'}; "
             f"ATen capability {machine['aten_capability']}; Winograd kernels {machine['winograd_isa']}; "
             f"torch {machine['torch']}. Median step times over alternating rounds of one run.", "",
             "| model | batch | threads | native ms | fused ms | fused/native | native ms/image | fused ms/image |",
             "|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {model_label(p.model, variant)} | {p.batch_size} | {p.threads} | {p.native_ms:.1f} | "
                     f"{p.fused_ms:.1f} | {p.ratio:.2f} | {p.native_ms / p.batch_size:.2f} | "
                     f"{p.fused_ms / p.batch_size:.2f} |")
    return "\n".join(lines) + "\n"


def plot(points: list[Point], variant: str, machine: dict[str, object], path: Path) -> None:
    """Step time vs batch size (log-log), a line per model and implementation, a panel per thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the non-interactive backend

    threads = sorted({p.threads for p in points})
    fig, axes = plt.subplots(1, len(threads), figsize=(5.5 * len(threads), 4.2), squeeze=False, sharey=True)
    for ax, count in zip(axes[0], threads):
        for model in dict.fromkeys(p.model for p in points):
            series = sorted((p for p in points if p.model == model and p.threads == count), key=lambda p: p.batch_size)
            sizes = [p.batch_size for p in series]
            line, = ax.plot(sizes, [p.native_ms for p in series], "o--", label=f"{model_label(model, variant)} native")
            ax.plot(sizes, [p.fused_ms for p in series], "s-", color=line.get_color(),
                    label=f"{model_label(model, variant)} fused")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_xticks(sorted({p.batch_size for p in points}), [str(b) for b in sorted({p.batch_size for p in points})])
        ax.set_xlabel("batch size")
        ax.set_title(f"{count} thread{'s' * (count > 1)}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("training step, ms")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{machine['cpu_model']} (ATen {machine['aten_capability']}, Winograd {machine['winograd_isa']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    try:
        return [positive_int(v) for v in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, e.g. 32,100,256; "
                                         f"got {text!r}") from None


def model_names(text: str) -> list[str]:
    names = text.split(",")
    for name in names:
        try:
            build_model(name)  # the model's own error lists the valid depths
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vggbench.bench.scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--models", type=model_names, default=["vgg08", "vgg38", "vgg98"],
                        help="comma-separated depths (default: vgg08,vgg38,vgg98)")
    parser.add_argument("--variant", choices=("plain", "bn", "rc", "bn_rc"), default="bn_rc",
                        help="model variant (default: bn_rc)")
    parser.add_argument("--batch-sizes", type=positive_ints, default=[32, 100, 256],
                        help="comma-separated batch sizes (default: 32,100,256)")
    parser.add_argument("--threads", type=positive_ints, default=[1, 2],
                        help="comma-separated torch thread counts (default: 1,2)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="timed rounds per configuration (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measure every configuration; write scaling.json, scaling.md and scaling.png into --out."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"--out {args.out}: cannot create it ({err.strerror})")
    machine = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               **instruction_sets()}
    configs = [(m, b, t) for m in args.models for b in args.batch_sizes for t in args.threads]
    points = [measure(m, args.variant, b, t, args.rounds, args.warmup)
              for m, b, t in tqdm(configs, desc="scaling", unit="config", file=sys.stderr)]
    (args.out / "scaling.json").write_text(json.dumps(
        {"machine": machine, "variant": args.variant, "rounds": args.rounds, "warmup": args.warmup,
         "points": [asdict(p) | {"ratio": p.ratio} for p in points]}, indent=1))
    (args.out / "scaling.md").write_text(render_table(points, args.variant, machine))
    plot(points, args.variant, machine, args.out / "scaling.png")
    print(f"wrote scaling.json, scaling.md and scaling.png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
