"""The main job: a short version of the study, end to end, in a few minutes on a 2-core CPU.

Trains VGG08, VGG38, VGG38 BN, VGG38 RC and VGG38 BN+RC with the same short
protocol, probing the loss landscape after every epoch (--landscape-every 1), then writes
per-run plots, comparison plots (compare.png, landscape-compare.png) and the Table-1 style
report with smoothness columns into one directory. Uses CIFAR-100 when it is in --data-dir (or can be downloaded),
otherwise the synthetic stand-in dataset, and says so loudly.

Re-running the same command continues where it stopped: finished runs are kept,
interrupted ones resume from their last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from vggbench import plot, report
from vggbench.checkpoint import CheckpointError, atomic_write_text, epoch_checkpoints
from vggbench.config import IMPL_CHOICES, ConfigError, TrainConfig
from vggbench.data import DataError, cifar100_available, prepare_cifar100
from vggbench.landscape.plots import plot_comparison as plot_landscapes
from vggbench.landscape.plots import plot_run as plot_landscape
from vggbench.landscape.probe import final_smoothness
from vggbench.runs import load_run
from vggbench.train import SYNTHETIC_BANNER, train

STUDY_RUNS = (("vgg08", "plain"), ("vgg38", "plain"), ("vgg38", "bn"), ("vgg38", "rc"), ("vgg38", "bn_rc"))


def choose_dataset(requested: str, data_dir: str) -> str:
    """"cifar100" when it is on disk or downloadable (for "auto"), else "synthetic"."""
    if requested != "auto":
        return requested
    if cifar100_available(data_dir):
        return "cifar100"
    try:
        prepare_cifar100(data_dir, download=True)
        return "cifar100"
    except DataError as err:
        print(f"CIFAR-100 is not in {data_dir} and could not be downloaded ({err}).", flush=True)
        return "synthetic"


def run_configs(args: argparse.Namespace, dataset: str) -> list[TrainConfig]:
    """The five study configurations with the demo's short protocol."""
    base = TrainConfig(
        dataset=dataset, data_dir=args.data_dir, verify_checksums=args.verify_checksums, epochs=args.epochs, lr=args.lr,
        seed=args.seed,
        batch_size=100, val_size=args.val_size, train_limit=args.train_limit if dataset == "cifar100" else None,
        synthetic_train_size=args.synthetic_train_size, synthetic_test_size=args.synthetic_test_size,
        workers=args.workers, device=args.device, impl=args.impl, progress=args.progress,
        landscape_every=1,
    )
    return [replace(base, model=m, variant=v, out_dir=str(Path(args.out) / "runs" / f"{m}-{v}"))
            for m, v in STUDY_RUNS]


def run_or_continue(cfg: TrainConfig) -> None:
    """Train `cfg`, resuming an interrupted run and skipping a finished one."""
    if (cfg.run_dir / "test.json").exists():
        print(f"[{cfg.label}] already finished in {cfg.run_dir}: kept", flush=True)
        return
    resume = "latest" if epoch_checkpoints(cfg.run_dir / "checkpoints") else None
    train(replace(cfg, resume=resume))


def summarise(run_dirs: list[Path]) -> list[str]:
    """One line per run: last-epoch train loss and the gradient-flow diagnosis (the signature)."""
    lines = []
    for run in map(load_run, run_dirs):
        last, flow = run.metrics[-1], run.require_gradflow()["epochs"][-1]["diagnosis"]
        ratio = f"{flow['ratio']:.1e}" if flow["ratio"] is not None else "n/a"
        lines.append(f"  {run.label:<13} train loss {last['train_loss']:.3f}  val acc {last['val_acc']:5.2f}%  "
                     f"gradients {flow['status']:<9} (first/last layer ratio {ratio})")
    return lines


def smoothness_paragraph(run_dirs: list[Path], dataset: str) -> str:
    """What the landscape probe measured, in words, ranked by effective beta-smoothness (smaller: smoother)."""
    runs = [(load_run(d).label, final_smoothness(d)) for d in run_dirs]
    runs = sorted(((label, s) for label, s in runs if s is not None), key=lambda item: item[1]["beta_smoothness"])
    if not runs:
        return ""
    data = ("the **synthetic** stand-in dataset (learnable class patterns, not CIFAR-100: the figures show the "
            "mechanism, not the study's values)" if dataset == "synthetic" else "CIFAR-100 (a short run)")
    ranking = ", ".join(f"{label} {s['beta_smoothness']:.3g} (loss band {s['loss_band']:.3g})" for label, s in runs)
    smooth = {label: s["beta_smoothness"] for label, s in runs}
    pairs = [(a, b) for a, b in (("VGG38 BN", "VGG38"), ("VGG38 BN+RC", "VGG38 RC")) if a in smooth and b in smooth]
    verdicts = " ".join(f"{a} is {'smoother' if smooth[a] < smooth[b] else 'NOT smoother'} than {b} here "
                        f"({smooth[a]:.3g} vs {smooth[b]:.3g})." for a, b in pairs)
    return ("\n## Loss landscape along training\n\n"
            f"Measured on {data}, after epoch {runs[0][1]['epoch']}, on a fixed batch of training images: the "
            "effective beta-smoothness max_s ||grad L(θ) - grad L(θ - lr·s·g)|| / (lr·s·||g||) over s in "
            "0.25..4, and the loss band (max - min of L(θ - lr·s·g)) (Santurkar et al. 2018, Fig. 4; smaller is "
            f"smoother). From smoothest to roughest: {ranking}. {verdicts} "
            "Over training: landscape-compare.png and runs/*/landscape.png.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vggbench.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-output", help="directory for runs, plots and report "
                        "(default: demo-output)")
    parser.add_argument("--dataset", default="auto", choices=("auto", "cifar100", "synthetic"),
                        help="auto: CIFAR-100 if on disk or downloadable, else synthetic (default: auto)")
    parser.add_argument("--data-dir", default="data", help="where CIFAR-100 is or goes (default: data)")
    parser.add_argument("--verify-checksums", action=argparse.BooleanOptionalAction, default=True,
                        help="check the MD5 sums of the official CIFAR-100 files (default: on)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (default: 3)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    parser.add_argument("--val-size", type=int, default=500, help="validation images (default: 500)")
    parser.add_argument("--train-limit", type=int, default=4500,
                        help="CIFAR-100 only: training images per run, class-balanced (default: 4500)")
    parser.add_argument("--synthetic-train-size", type=int, default=5000,
                        help="synthetic only: training+validation images (default: 5000)")
    parser.add_argument("--synthetic-test-size", type=int, default=1000,
                        help="synthetic only: test images (default: 1000)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default: 0, best on 2 cores)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--impl", default="auto", choices=IMPL_CHOICES,
                        help="layers: native PyTorch, the fused C++/CUDA op, or auto: fused where it is the "
                        "faster (on the CPU: fp32 channels_last Winograd convs), else native (default: auto)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="tqdm progress bars (default: only on a terminal)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the five configurations, then plot and report; print where everything is."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        dataset = choose_dataset(args.dataset, args.data_dir)
        configs = [cfg.validate() for cfg in run_configs(args, dataset)]
        for cfg in configs:
            run_or_continue(cfg)
    except (ConfigError, CheckpointError, DataError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    run_dirs = [cfg.run_dir for cfg in configs]
    plot.main([*map(str, run_dirs), "--out", str(out)])
    report.main([*map(str, run_dirs), "--out", str(out / "report.md")])
    for run_dir in run_dirs:
        plot_landscape(run_dir)
    plot_landscapes(run_dirs, out)
    atomic_write_text(out / "report.md", (out / "report.md").read_text() + smoothness_paragraph(run_dirs, dataset))
    print("\nGradient-flow signature (last epoch):", *summarise(run_dirs), sep="\n")
    if dataset == "synthetic":
        print(f"\n{SYNTHETIC_BANNER}")
    print(f"\nEverything is in {out.resolve()}: report.md, compare.png, landscape-compare.png, runs/*/gradflow.png, "
          "runs/*/curves.png, runs/*/landscape.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
