"""Train one model of the study: `python -m vggbench.train --model vgg38 --variant bn_rc`.

One run directory per run (see README, "Outputs"): config.json, metrics.jsonl,
summary.csv, gradflow.json, checkpoints/, and test.json once the best-validation
checkpoint has been evaluated on the test set. `--resume` continues a run exactly.

Distributed: started by `python -m vggbench.launch`, torchrun or srun (see
vggbench.distributed), every rank trains under DistributedDataParallel on its share of
each global batch (--batch-size images per rank); rank 0 alone writes the files and
prints progress.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from vggbench.checkpoint import (
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    epoch_checkpoints,
    load_checkpoint,
    newest_checkpoint,
    save_best,
    save_epoch_checkpoint,
)
from vggbench.config import (
    RUNTIME_OPTIONS,
    ConfigError,
    TrainConfig,
    add_config_arguments,
    explicit_options,
    flag,
)
from vggbench.data import DataError, build_loader, build_splits, rank_shard
from vggbench.distributed import DistEnv, process_group, rank_device
from vggbench.gradflow import GradientFlowRecorder
from vggbench.landscape.probe import LandscapeProbe
from vggbench.models import VGG, build_model, convert_sync_batchnorm

METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "images_per_s",
                  "dataset")
RUN_FACTS = ("label", "num_params", "torch", "resolved_device")  # what config.json adds to the config
# config.json also records the distributed setup; unlike RUN_FACTS it distinguishes configurations
# (a different global batch trains differently)
DISTRIBUTED_FACTS = ("world_size", "global_batch_size")
SYNTHETIC_BANNER = "*** SYNTHETIC DATA: not CIFAR-100; results show the mechanism, not the study's figures ***"


def resolve_device(name: str) -> torch.device:
    """Turn --device into a torch.device, failing clearly when it is not available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name}: only cpu and cuda are supported")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse mixed-precision modes the device cannot run."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16 is not supported by this GPU; use fp16 or fp32")


def make_model(cfg: TrainConfig) -> VGG:
    """The model a config describes."""
    return build_model(
        cfg.model, cfg.variant, filters=cfg.filters, stages=cfg.stages, convs_per_block=cfg.convs_per_block,
        residual_reduction=cfg.residual_reduction, activation=cfg.activation,
        negative_slope=cfg.negative_slope, bn_position=cfg.bn_position, impl=cfg.impl,
    )


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam (the study), SGD with momentum, or AdamW."""
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    optimizer = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch cosine annealing (eta_min 2e-5 in the study), with optional warm restarts."""
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.eta_min)
    if cfg.scheduler == "cosine_restarts":
        return sched.CosineAnnealingWarmRestarts(optimizer, T_0=cfg.restart_period, eta_min=cfg.eta_min)
    return sched.LambdaLR(optimizer, lambda epoch: 1.0)


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    """channels_last with --channels-last, else contiguous."""
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank `rank`'s augmentation and data-loading workers: `seed` itself on rank 0.

    Other ranks get independent streams (a hash of seed and rank), so ranks do not crop
    and flip their images alike; shuffling is shared through the DistributedSampler.
    """
    if rank == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # a non-negative 63-bit seed


def prepare_model(cfg: TrainConfig, device: torch.device, env: DistEnv) -> tuple[nn.Module, nn.Module]:
    """The model of `cfg` on `device`, and what training calls: itself, or its DDP wrapper on several ranks.

    With --sync-bn on several ranks its BatchNorm layers become SyncBatchNorm2d first. The
    first module is the plain one (checkpoints hold its state_dict, evaluation runs it).
    """
    model = make_model(cfg)
    if cfg.sync_bn and env.distributed:
        model = convert_sync_batchnorm(model)
    model = model.to(device, memory_format=memory_format(cfg))
    if not env.distributed:
        return model, model
    return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class Trainer:
    """Owns one run: model, optimiser, data, history; trains epochs and evaluates.

    In a distributed run every rank holds a Trainer; they stay in step through the
    collectives (DDP's gradient all-reduce, metric sums, barriers) and hold the same state,
    and only rank 0 (`env.is_main`) writes files and prints.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device, env: DistEnv | None = None) -> None:
        self.cfg, self.device, self.env = cfg, device, env or DistEnv()
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.memory_format = memory_format(cfg)
        torch.manual_seed(cfg.seed)
        try:
            with self._rank0_first():  # rank 0 alone checks (or downloads) the data files
                self.splits = build_splits(
                    cfg.dataset, cfg.data_dir, download=cfg.download, verify_checksums=cfg.verify_checksums,
                    val_size=cfg.val_size, split_seed=cfg.split_seed, train_limit=cfg.train_limit,
                    synthetic_train_size=cfg.synthetic_train_size, synthetic_test_size=cfg.synthetic_test_size,
                    synthetic_seed=cfg.split_seed, augment=cfg.augment,
                )
        except ValueError as err:  # sizes the data cannot be split into
            raise ConfigError(f"data: {err}") from None
        self.model, self.train_model = prepare_model(cfg, device, self.env)
        self.optimizer = make_optimizer(cfg, self.model)
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.recorder = GradientFlowRecorder(self.model, window=cfg.gradflow_every)
        self.landscape = LandscapeProbe.for_trainer(self)
        self.metrics: list[dict] = []
        self.best = {"epoch": 0, "val_acc": -1.0}
        self.epoch = 0

    # --- state -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue after the current epoch (tensors and plain data only)."""
        return {
            "epoch": self.epoch, "config": self.cfg.identity(), "runtime": self.cfg.runtime(),
            "world_size": self.env.world_size, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": {"metrics": self.metrics, "gradflow": self.recorder.state_dict(), "best": self.best,
                        "landscape": self.landscape.state_dict()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()` (from a checkpoint loaded with weights_only=True)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.recorder.load_state_dict(state["history"]["gradflow"])
        if "landscape" in state["history"]:  # checkpoints from before the probe have none
            self.landscape.load_state_dict(state["history"]["landscape"])
        self.metrics = list(state["history"]["metrics"])
        self.best = dict(state["history"]["best"])
        self.epoch = state["epoch"]

    # --- files (rank 0) ----------------------------------------------------------------
    def write_config(self) -> None:
        """config.json: the resolved config plus label, #params, torch version, device and world size."""
        num_params = sum(p.numel() for p in self.model.parameters())
        info = dict(zip(RUN_FACTS, (self.cfg.label, num_params, torch.__version__, str(self.device))))
        world = dict(zip(DISTRIBUTED_FACTS, (self.env.world_size, self.env.world_size * self.cfg.batch_size)))
        atomic_write_json(self.run_dir / "config.json", {**asdict(self.cfg), **world, **info})

    def write_history(self) -> None:
        """Rewrite metrics.jsonl, summary.csv, gradflow.json (and landscape.json) from the in-memory history."""
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics))
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=METRIC_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.metrics)
        atomic_write_text(self.run_dir / "summary.csv", table.getvalue())
        atomic_write_json(self.run_dir / "gradflow.json", {"dataset": self.splits.kind, **self.recorder.state_dict()})
        self.landscape.write(self.run_dir, self.splits.kind)

    # --- ranks -----------------------------------------------------------------------
    def _barrier(self) -> None:
        """Wait until every rank has arrived (nothing on a single process)."""
        if self.env.distributed:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @contextlib.contextmanager
    def _rank0_first(self):
        """Run the block on rank 0 first and on the other ranks once it has finished there."""
        if not self.env.is_main:
            self._barrier()
        yield
        if self.env.is_main:
            self._barrier()

    def _sum_over_ranks(self, *values: torch.Tensor | int) -> list[float]:
        """Sums of scalars over all ranks in one all-reduce (float64: counts stay exact)."""
        total = torch.stack([torch.as_tensor(v, device=self.device).double() for v in values])
        if self.env.distributed:
            dist.all_reduce(total)
        return total.tolist()

    def _share_rank0_buffers(self) -> None:
        """Give every rank rank 0's buffers (BN running statistics: per-rank without --sync-bn).

        Evaluation and checkpoints then see one model on every rank: the one rank 0 saves.
        """
        if self.env.distributed:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)

    # --- loops -----------------------------------------------------------------------
    def _batches(self, loader, desc: str):
        """Yield (progress bar or loader, images, targets) on the device; tqdm (rank 0) unless --no-progress."""
        show = self.cfg.progress is not False and self.env.is_main
        bar = tqdm(loader, desc=desc, leave=False, disable=False if self.cfg.progress else None,
                   dynamic_ncols=True) if show else loader
        for images, targets in bar:
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            yield bar, images, targets.to(self.device, non_blocking=True)

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _train_loader(self, epoch: int):
        """This epoch's training batches of this rank; they depend only on (seed, epoch, rank)."""
        cfg, env = self.cfg, self.env
        seed = rank_seed(cfg.seed * 1000 + epoch, env.rank)
        torch.manual_seed(seed)  # augmentation in the main process
        sampler = None
        if env.distributed:  # one shuffle of the whole split (same on every rank), rank r takes every r-th
            sampler = DistributedSampler(self.splits.train, env.world_size, env.rank, shuffle=True, seed=cfg.seed)
            sampler.set_epoch(epoch)
        return build_loader(self.splits.train, cfg.batch_size, train=True, workers=cfg.workers, device=self.device,
                            generator=torch.Generator().manual_seed(seed), sampler=sampler)

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training split (this rank's share); returns global loss/accuracy/throughput."""
        loader = self._train_loader(epoch)
        self.train_model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen, start = 0, time.perf_counter()
        for step, (bar, images, targets) in enumerate(self._batches(loader, f"epoch {epoch}/{self.cfg.epochs}")):
            with self._autocast():
                logits = self.train_model(images)
                loss = F.cross_entropy(logits.float(), targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # DDP: gradients averaged over the ranks when it returns
            self.scaler.unscale_(self.optimizer)  # gradient flow sees true gradients
            self.recorder.record()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss_sum += loss.detach() * len(targets)
            correct += (logits.argmax(1) == targets).sum()
            seen += len(targets)
            if hasattr(bar, "set_postfix") and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")  # a host sync, every 20 steps only
        loss_total, correct_total, seen_total = self._sum_over_ranks(loss_sum, correct, seen)
        elapsed = time.perf_counter() - start
        return {"train_loss": loss_total / seen_total, "train_acc": 100.0 * correct_total / seen_total,
                "epoch_time_s": elapsed, "images_per_s": seen_total / elapsed}

    @torch.no_grad()
    def evaluate(self, dataset, desc: str) -> tuple[float, float]:
        """Mean cross-entropy and accuracy (%) of the model in eval mode over `dataset` (sharded over ranks)."""
        shard = rank_shard(dataset, self.env.rank, self.env.world_size)
        loader = build_loader(shard, self.cfg.batch_size, train=False, workers=self.cfg.workers, device=self.device)
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for _, images, targets in self._batches(loader, desc):
            with self._autocast():
                logits = self.model(images).float()
            loss_sum += F.cross_entropy(logits, targets, reduction="sum")
            correct += (logits.argmax(1) == targets).sum()
        loss_total, correct_total = self._sum_over_ranks(loss_sum, correct)
        return loss_total / len(dataset), 100.0 * correct_total / len(dataset)

    def _print(self, message: str) -> None:
        """Progress output: rank 0 only."""
        if self.env.is_main:
            print(message, flush=True)

    def fit(self) -> dict:
        """Train the remaining epochs, then evaluate the best-validation checkpoint on the test set."""
        cfg = self.cfg
        while self.epoch < cfg.epochs:
            epoch = self.epoch + 1
            lr = self.optimizer.param_groups[0]["lr"]
            row = {"epoch": epoch, "lr": lr, "dataset": self.splits.kind, **self.train_epoch(epoch)}
            self._share_rank0_buffers()
            row["val_loss"], row["val_acc"] = self.evaluate(self.splits.val, "validation")
            self.landscape.record(epoch)  # at the lr the epoch trained with
            self.scheduler.step()
            flow = self.recorder.end_epoch(epoch)
            self.metrics.append({k: row[k] for k in METRIC_COLUMNS})
            self.epoch = epoch
            improved = row["val_acc"] > self.best["val_acc"]
            if improved:
                self.best = {"epoch": epoch, "val_acc": row["val_acc"]}
            if self.env.is_main:
                self.write_history()
                save_epoch_checkpoint(self.state_dict(), self.ckpt_dir, cfg.keep_checkpoints)
                if improved:
                    save_best({"epoch": epoch, "val_acc": row["val_acc"], "config": cfg.identity(),
                               "model": self.model.state_dict()}, self.ckpt_dir)
            self._print(f"[{cfg.label}] epoch {epoch}/{cfg.epochs} lr {lr:.2e} | train loss {row['train_loss']:.4f} "
                        f"acc {row['train_acc']:.2f}% | val loss {row['val_loss']:.4f} acc {row['val_acc']:.2f}% | "
                        f"{row['images_per_s']:.0f} img/s | gradients {flow['diagnosis']['status']}")
        return self.test()

    def test(self) -> dict:
        """Evaluate best.pt on the test split and write test.json."""
        self._barrier()  # rank 0 has finished writing best.pt before any rank reads it
        best = load_checkpoint(self.ckpt_dir / "best.pt", required=("format", "epoch", "model"))
        self.model.load_state_dict(best["model"])
        test_loss, test_acc = self.evaluate(self.splits.test, "test")
        result = {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "test_loss": test_loss,
                  "test_acc": test_acc, "dataset": self.splits.kind}
        if self.env.is_main:
            atomic_write_json(self.run_dir / "test.json", result)
        self._print(f"[{self.cfg.label}] test loss {test_loss:.4f} acc {test_acc:.2f}% "
                    f"(best validation epoch {best['epoch']}) -> {self.run_dir}")
        return result


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """Deterministic algorithms when asked (needed for bit-exact resume on GPUs); else fast cuDNN autotuning."""
    if deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def resume_state(cfg: TrainConfig, explicit: set[str] | None, world_size: int = 1) -> tuple[TrainConfig, dict | None]:
    """The config and checkpoint to continue from (or `cfg`, None for a fresh run).

    A resumed run keeps its saved configuration: options that change what is trained
    may not be given with a different value (`explicit`: the options the user typed;
    None checks them all), and it continues with the number of ranks it was trained
    with (`world_size`; the global batch depends on it). Runtime options (device,
    workers, data dir, ...) not typed are taken from the checkpoint. Starting afresh
    over existing checkpoints is refused.
    """
    ckpt_dir = cfg.run_dir / "checkpoints"
    if not cfg.resume:
        if epoch_checkpoints(ckpt_dir):
            raise ConfigError(f"{cfg.run_dir} already holds a run's checkpoints: continue it with --resume, "
                              "or choose another --out-dir")
        return cfg, None
    path = newest_checkpoint(ckpt_dir) if cfg.resume == "latest" else Path(cfg.resume)
    state = load_checkpoint(path)
    # options added since the checkpoint was written have their default there
    saved, given = {**TrainConfig().identity(), **state["config"]}, cfg.identity()
    unknown = set(saved) - set(given)
    if unknown:
        raise CheckpointError(f"checkpoint {path} has config keys this vggbench does not know: {sorted(unknown)}")
    checked = given.keys() if explicit is None else explicit - set(RUNTIME_OPTIONS)
    changed = [f"--{flag(k)} {given[k]!r} (run has {saved[k]!r})" for k in checked if saved.get(k) != given[k]]
    if changed:
        raise ConfigError(f"cannot change a run's configuration on --resume: {'; '.join(changed)}. "
                          "Start a new run in another --out-dir instead")
    saved_world = state.get("world_size", 1)
    if saved_world != world_size:
        raise ConfigError(f"{path} was trained by {saved_world} rank(s) (global batch {saved_world} x "
                          f"{saved['batch_size']}); this run has {world_size}. Resume with {saved_world} rank(s) "
                          f"(python -m vggbench.launch --nproc/--gpus {saved_world} ... --resume), or start a new run "
                          "in another --out-dir")
    typed = set(RUNTIME_OPTIONS) if explicit is None else explicit | {"out_dir", "resume"}
    runtime = {k: v if k in typed else state["runtime"].get(k, v) for k, v in cfg.runtime().items()}
    return TrainConfig(**{**given, **saved, **runtime}), state


def check_ranks_agree(cfg: TrainConfig, epoch: int, env: DistEnv) -> None:
    """Fail unless every rank trains the same configuration from the same epoch.

    Ranks started with different options, or reading different files (a run directory
    that is not on a filesystem shared by all nodes), would otherwise train garbage or hang.
    """
    mine = {"config": cfg.identity(), "epoch": epoch}
    everyone: list[dict] = [{}] * env.world_size
    dist.all_gather_object(everyone, mine)
    first = everyone[0]
    for rank, theirs in enumerate(everyone):
        if theirs["config"] != first["config"]:
            differing = sorted(k for k, v in theirs["config"].items() if first["config"].get(k) != v)
            raise ConfigError(f"rank {rank} trains another configuration than rank 0 (differing: "
                              f"{', '.join(map(flag, differing))}): every rank must run the same command")
        if theirs["epoch"] != first["epoch"]:
            raise ConfigError(f"rank {rank} resumes after epoch {theirs['epoch']}, rank 0 after epoch "
                              f"{first['epoch']}: every rank must read the same run directory (is {cfg.run_dir} "
                              "on a filesystem all nodes share?)")


def train(cfg: TrainConfig, explicit: set[str] | None = None, env: DistEnv | None = None) -> dict:
    """Run (or resume) the training `cfg` describes; return the test result of its best checkpoint.

    `env` says where this process sits in a distributed run (default: read from the
    environment of torchrun, srun or vggbench.launch; a single process without one).
    """
    env = DistEnv.from_environ() if env is None else env
    cfg, state = resume_state(cfg.validate(), explicit, env.world_size)
    cfg.validate()  # runtime options taken from the checkpoint meet the saved configuration
    device = rank_device(resolve_device(cfg.device), env)
    check_precision(cfg.precision, device)
    configure_determinism(cfg.deterministic, device)
    # every rank has checked the run directory before any rank can pass the rendezvous and write to it
    with process_group(env, device, timedelta(seconds=cfg.dist_timeout)):
        if env.distributed:
            check_ranks_agree(cfg, state["epoch"] if state else 0, env)
        trainer = Trainer(cfg, device, env)
        if state is not None:
            trainer.load_state_dict(state)
        if env.is_main:
            if state is not None:
                print(f"[{cfg.label}] resuming {cfg.run_dir} after epoch {trainer.epoch}", flush=True)
            if cfg.sync_bn and not env.distributed:
                print("note: --sync-bn has no effect in a single process (BatchNorm already sees the whole batch)",
                      flush=True)
            trainer.write_config()
            trainer.write_history()
            if trainer.splits.kind == "synthetic":
                print(SYNTHETIC_BANNER, flush=True)
        return trainer.fit()


def build_parser() -> argparse.ArgumentParser:
    """The `vggbench.train` command line: one option per TrainConfig field."""
    parser = argparse.ArgumentParser(
        prog="python -m vggbench.train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input exits with status 2 and a one-line explanation.

    Runs in-process under any launcher: torchrun, srun and submitit tasks (the rank comes
    from their environment, see vggbench.distributed) or vggbench.launch.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = TrainConfig(**vars(args))
    try:
        env = DistEnv.from_environ()
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    prefix = f"rank {env.rank}: " if env.distributed else ""
    try:
        train(cfg, explicit_options(argv if argv is not None else sys.argv[1:]), env)
    except (ConfigError, CheckpointError, DataError) as err:
        parser.exit(2, f"{parser.prog}: error: {prefix}{err}\n")
    except KeyboardInterrupt:
        if not env.is_main:
            parser.exit(130)  # rank 0 says how to continue
        again = (f"the same command plus --resume (run directory {cfg.run_dir})" if env.distributed
                 else f"{parser.prog} --out-dir {cfg.run_dir} --resume")
        parser.exit(130, f"\ninterrupted: completed epochs are checkpointed; continue with {again}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
