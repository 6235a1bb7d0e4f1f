"""The loss-landscape probe: `python -m vggbench.landscape {surface,plot} ...`.

  surface RUN_DIR   1-D or 2-D loss surface around a checkpoint along random filter-normalised
                    directions (Li et al. 2018), on a chosen split and number of images, written
                    as JSON + PNG. The grid's points are independent: --nproc N splits them over
                    N local CPU processes (gloo), --slurm over the tasks of a SLURM job (submitit,
                    as vggbench.launch --slurm); rank 0 gathers them into one file.
  plot RUN_DIR...   landscape.png per run (the measures recorded along training by
                    `vggbench.train --landscape-every N`, Santurkar et al. 2018) and
                    landscape-compare.png across the runs.

Examples:
  python -m vggbench.landscape surface runs/vgg38-bn_rc-lr0.001-seed7112018 --resolution 21 --nproc 2
  python -m vggbench.landscape surface RUN --dims 1 --resolution 51 --split train --samples 5000
  python -m vggbench.landscape surface RUN --slurm --ntasks-per-node 8 --time 60 --resolution 51 --wait
  python -m vggbench.landscape plot runs/* --out plots
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace
from datetime import timedelta
from pathlib import Path

import submitit
import torch

from vggbench import launch
from vggbench.checkpoint import (
    CheckpointError,
    WriteError,
    atomic_write_json,
    check_writable_dir,
    load_checkpoint,
    newest_checkpoint,
)
from vggbench.config import ConfigError, TrainConfig
from vggbench.data import DataError, build_splits
from vggbench.distributed import DistEnv, process_group
from vggbench.landscape.plots import plot_comparison, plot_run, plot_surface
from vggbench.landscape.surface import Grid, directions, evaluate_grid
from vggbench.runs import RunError
from vggbench.train import make_model

PROG = "python -m vggbench.landscape"
SPLITS = ("train", "val", "test")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    surface = commands.add_parser("surface", help="loss surface around a checkpoint (Li et al. 2018)",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    surface.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory of vggbench.train")
    surface.add_argument("--checkpoint", type=Path, help="checkpoint file (default: the run's newest epoch checkpoint)")
    surface.add_argument("--dims", type=int, choices=(1, 2), default=2, help="1-D curve or 2-D surface")
    surface.add_argument("--resolution", type=int, default=21, help="grid points per axis")
    surface.add_argument("--range", type=float, nargs=2, default=(-1.0, 1.0), metavar=("LOW", "HIGH"),
                         help="coordinates along each direction (1 = one filter norm)")
    surface.add_argument("--split", choices=SPLITS, default="val", help="images the loss is taken over "
                         "(train: without augmentation)")
    surface.add_argument("--samples", type=int, default=2500, help="first N images of the split")
    surface.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    surface.add_argument("--batch-size", type=int, default=500, help="images per forward pass")
    surface.add_argument("--data-dir", help="where the run's data is (default: the run's --data-dir)")
    surface.add_argument("--out", type=Path, help="JSON to write, PNG beside it "
                         "(default: RUN_DIR/surface-<dims>d-<split>-<resolution>.json)")
    surface.add_argument("--dist-timeout", type=int, default=1800, help="seconds a rank waits for the others")
    surface.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar")
    launch.add_local_arguments(surface)
    launch.add_slurm_arguments(surface)
    plot = commands.add_parser("plot", help="landscape.png per run and landscape-compare.png")
    plot.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    plot.add_argument("--out", type=Path, default=Path("."), help="directory of landscape-compare.png (default: .)")
    return parser


def run_config(run_dir: Path) -> TrainConfig:
    """The TrainConfig a run directory was trained with (config.json)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise RunError(f"{path}: not found; RUN_DIR must be a run directory written by vggbench.train")
    saved = json.loads(path.read_text())
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def checkpoint_of(args: argparse.Namespace) -> Path:
    """--checkpoint, else the run's newest epoch checkpoint; CheckpointError when there is none."""
    if args.checkpoint is not None:
        return args.checkpoint
    try:
        return newest_checkpoint(args.run_dir / "checkpoints")
    except CheckpointError:
        raise CheckpointError(f"{args.run_dir} holds no epoch checkpoint (checkpoints/epoch-NNNN.pt): train it first, "
                              "or name one with --checkpoint PATH") from None


def check_surface(args: argparse.Namespace) -> tuple[TrainConfig, Path, Grid]:
    """Everything that can be checked before any rank starts."""
    cfg = run_config(args.run_dir)
    ckpt = checkpoint_of(args)
    grid = Grid(args.dims, args.resolution, *args.range)
    for name in ("samples", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_writable_dir(surface_path(args, grid).parent, "--out")
    return cfg, ckpt, grid


def surface_path(args: argparse.Namespace, grid: Grid) -> Path:
    """Where the surface's JSON goes (its PNG beside it): --out, or a name in the run directory."""
    return args.out or args.run_dir / f"surface-{grid.dims}d-{args.split}-{grid.resolution}.json"


def surface(args: argparse.Namespace, env: DistEnv) -> Path | None:
    """Evaluate the surface on this rank's points; rank 0 writes JSON and PNG and returns the JSON's path."""
    cfg, ckpt, grid = check_surface(args)
    data_dir = args.data_dir or cfg.data_dir
    splits = build_splits(cfg.dataset, data_dir, verify_checksums=cfg.verify_checksums, val_size=cfg.val_size,
                          split_seed=cfg.split_seed, train_limit=cfg.train_limit,
                          synthetic_train_size=cfg.synthetic_train_size, synthetic_test_size=cfg.synthetic_test_size,
                          synthetic_seed=cfg.split_seed, augment=False)
    dataset = getattr(splits, args.split)
    if args.samples > len(dataset):
        raise ValueError(f"--samples {args.samples}: the {args.split} split has only {len(dataset)} images")
    images, targets = zip(*(dataset[i] for i in range(args.samples)))
    images, targets = torch.stack(images), torch.tensor(targets)
    model = make_model(replace(cfg, impl="native"))
    model.load_state_dict(load_checkpoint(ckpt, required=("format", "model"))["model"])
    dirs = directions(model, grid.dims, args.seed)
    with process_group(env, torch.device("cpu"), timedelta(seconds=args.dist_timeout)):
        result = evaluate_grid(model, grid, dirs, images, targets, args.batch_size, env, args.progress)
    if result is None:
        return None
    out = surface_path(args, grid)
    atomic_write_json(out, {"run_dir": str(args.run_dir), "checkpoint": str(ckpt), "label": cfg.label,
                            "dataset": splits.kind, "split": args.split, "samples": args.samples,
                            "dims": grid.dims, "resolution": grid.resolution, "range": [grid.low, grid.high],
                            "seed": args.seed, "world_size": env.world_size,
                            "directions": "filter-normalised Gaussian (Li et al. 2018); BN and bias directions 0",
                            **result})
    plot_surface(out)
    print(f"wrote {out} and {out.with_suffix('.png')}", flush=True)
    return out


def _rank_argv(argv: list[str]) -> list[str]:
    """The surface command line without the launch options (each rank computes in-process)."""
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
        elif arg.split("=")[0] in ("--nproc",):
            skip = 0 if "=" in arg else 1
        else:
            out.append(arg)
    return out


class SurfaceJob(submitit.helpers.Checkpointable):
    """A surface as a submitit job: every task is one rank of `surface` (requeued jobs start over)."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    def __call__(self) -> str | None:
        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        args = build_parser().parse_args(self.argv)
        out = surface(args, DistEnv.from_environ())
        return str(out) if out else None


def submit_surface(args: argparse.Namespace, argv: list[str]) -> int:
    """--slurm: one job, --ntasks-per-node tasks per node, each a rank of the surface."""
    from vggbench import slurm  # submitit's executor setup, shared with vggbench.launch --slurm

    if args.sweep or args.gpus_per_node:
        raise ValueError("a surface runs on CPU tasks: --sweep and --gpus-per-node do not apply")
    rank_argv = [a for a in argv if a not in ("--slurm", "--wait")]
    tasks = args.ntasks_per_node or 1
    executor = slurm._executor(args, args.run_dir / slurm.LOG_DIR, tasks, "vggbench-surface")
    job = executor.submit(SurfaceJob(rank_argv))
    print(f"submitted job {job.job_id} ({args.nodes} node(s) x {tasks} task(s)); "
          f"logs in {args.run_dir / slurm.LOG_DIR}",
          flush=True)
    if not args.wait:
        return 0
    out = next((r for r in job.results() if r), None)
    print(f"job {job.job_id} finished: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input exits with status 2 and a one-line explanation."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        if args.command == "plot":
            check_writable_dir(args.out, "--out")
            for run_dir in args.run_dirs:
                print(f"wrote {plot_run(run_dir)}")
            print(f"wrote {plot_comparison(args.run_dirs, args.out)}")
            return 0
        if args.gpus is not None:
            raise ValueError("--gpus does not apply: a surface is evaluated on CPU processes (--nproc N)")
        check_surface(args)  # fail here, before any rank or job starts
        if args.slurm:
            return submit_surface(args, argv)
        if args.nproc is not None:
            if args.nproc < 1:
                raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
            command = [sys.executable, "-m", "vggbench.landscape", *_rank_argv(argv)]
            return launch.run_ranks([command] * args.nproc, launch.rank_environments(args.nproc, launch.free_port()))
        surface(args, DistEnv.from_environ())
    except (ValueError, ConfigError, CheckpointError, DataError, RunError, WriteError) as err:
        parser.exit(2, f"{PROG}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
