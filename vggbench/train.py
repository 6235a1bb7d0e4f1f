"""Train one model of the study: `python -m vggbench.train --model vgg38 --variant bn_rc`.

One run directory per run (its files and the order they are written in: vggbench.run_dir;
README, "Outputs"). `--resume` continues a run exactly (vggbench.resume). Options, run
directory, device and memory are checked before data and model are built (vggbench.config,
vggbench.run_dir, vggbench.device, vggbench.capacity).

--cuda-graphs: the training step and the evaluation forward are captured in CUDA graphs and
replayed per batch (vggbench.graphs); both modes run the same step functions.

Distributed: started by `python -m vggbench.launch`, torchrun or srun (see
vggbench.distributed), every rank trains under DistributedDataParallel on its share of
each global batch (--batch-size images per rank); rank 0 alone writes the files and
prints progress.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from vggbench.capacity import check_batches, check_memory, out_of_memory
from vggbench.checkpoint import BEST_KEYS, CheckpointError, WriteError, load_checkpoint
from vggbench.config import (
    ConfigError,
    TrainConfig,
    add_config_arguments,
    explicit_options,
    flag,
)
from vggbench.data import (
    DataError,
    build_loader,
    build_splits,
    epoch_generator,
    rank_shard,
)
from vggbench.device import autocast, choose_channels_last, choose_impl, memory_format, setup_device
from vggbench.distributed import DistEnv, main_rank_first, process_group
from vggbench.gradflow import GradientFlowRecorder
from vggbench.graphs import GraphedStep, Step, Totals, check_capturable
from vggbench.landscape.probe import LandscapeProbe
from vggbench.models import VGG, build_model, convert_sync_batchnorm
from vggbench.optim import load_optimizer_state, make_optimizer, make_scheduler
from vggbench.resume import resume_state
from vggbench.run_dir import METRIC_COLUMNS, RUN_FACTS, RunDir, newest_epoch

# config.json also records the distributed setup; unlike RUN_FACTS it distinguishes configurations
# (a different global batch trains differently)
DISTRIBUTED_FACTS = ("world_size", "global_batch_size")
SYNTHETIC_BANNER = "*** SYNTHETIC DATA: not CIFAR-100; results show the mechanism, not the study's figures ***"


def make_model(cfg: TrainConfig) -> VGG:
    """The model a config describes."""
    return build_model(**cfg.model_spec())


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
        self.run_dir = RunDir(cfg.run_dir)
        self.memory_format = memory_format(cfg)
        torch.manual_seed(cfg.seed)
        try:
            with main_rank_first(self.env):  # rank 0 alone checks (or downloads) the data files
                self.splits = build_splits(
                    cfg.dataset, cfg.data_dir, download=cfg.download, verify_checksums=cfg.verify_checksums,
                    val_size=cfg.val_size, split_seed=cfg.split_seed, train_limit=cfg.train_limit,
                    synthetic_train_size=cfg.synthetic_train_size, synthetic_test_size=cfg.synthetic_test_size,
                    synthetic_seed=cfg.split_seed, augment=cfg.augment, augment_seed=cfg.seed,
                )
        except ValueError as err:  # sizes the data cannot be split into
            raise ConfigError(f"data: {err}") from None
        check_batches(cfg, len(self.splits.train), self.env.world_size)  # before the model is built
        self.model, self.train_model = prepare_model(cfg, device, self.env)
        self.optimizer = make_optimizer(cfg, self.model, capturable=cfg.cuda_graphs and device.type == "cuda")
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.recorder = GradientFlowRecorder(self.model, window=cfg.gradflow_every)
        self.landscape = LandscapeProbe.for_trainer(self)
        self.train_totals, self.eval_totals = Totals(device), Totals(device)
        self.train_step = self._graphed(self._train_step, key=self._learning_rates)
        self.eval_step = self._graphed(self._eval_step)
        self.metrics: list[dict] = []
        self.best = {"epoch": 0, "val_acc": -1.0}
        self.best_model: dict[str, torch.Tensor] = {}  # the best epoch's weights (on the CPU)
        self.epoch = 0

    # --- state -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue after the current epoch (tensors and plain data only)."""
        return {
            "epoch": self.epoch, "config": self.cfg.identity(), "runtime": self.cfg.runtime(),
            "world_size": self.env.world_size, "model": self.model.state_dict(), "best_model": self.best_model,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": {"metrics": self.metrics, "gradflow": self.recorder.state_dict(), "best": self.best,
                        "landscape": self.landscape.state_dict()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()` (from a checkpoint loaded with weights_only=True)."""
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise CheckpointError(f"the checkpoint's weights do not fit its configuration's model "
                                  f"({str(err).splitlines()[0]})") from None
        self.best_model = dict(state["best_model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.recorder.load_state_dict(state["history"]["gradflow"])
        if "landscape" in state["history"]:  # checkpoints from before the probe have none
            self.landscape.load_state_dict(state["history"]["landscape"])
        self.metrics = list(state["history"]["metrics"])
        self.best = dict(state["history"]["best"])
        self.epoch = state["epoch"]

    # --- files (rank 0) ----------------------------------------------------------------
    def config_record(self) -> dict:
        """config.json: the resolved config plus label, #params, torch version, device and world size."""
        num_params = sum(p.numel() for p in self.model.parameters())
        info = dict(zip(RUN_FACTS, (self.cfg.label, num_params, torch.__version__, str(self.device))))
        world = dict(zip(DISTRIBUTED_FACTS, (self.env.world_size, self.env.world_size * self.cfg.batch_size)))
        return {**asdict(self.cfg), **world, **info}

    def restore_run_dir(self, state: dict) -> None:
        """Bring the run directory in line with the checkpoint `state` the run resumes from (rank 0)."""
        for note in self.run_dir.restore(state, self.config_record(), self.splits.kind, self.cfg.epochs):
            self._print(f"[{self.cfg.label}] {note}")

    # --- ranks -----------------------------------------------------------------------
    def _barrier(self) -> None:
        """Wait until every rank has arrived (nothing on a single process)."""
        if self.env.distributed:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

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

    # --- steps: device work only, so that --cuda-graphs can capture them ------------------------
    def _graphed(self, step: Step, key: Callable[[], object] | None = None) -> Step:
        """`step` as --cuda-graphs runs it (vggbench.graphs.GraphedStep: captured again when `key()`
        changes), or `step` itself."""
        if not self.cfg.cuda_graphs:
            return step
        return GraphedStep(step, self.cfg.batch_size, capture=self.device.type == "cuda", key=key)

    def _learning_rates(self) -> list[float]:
        """What a captured training step bakes in (captured again when it changes)."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def _autocast(self) -> torch.autocast:
        """--precision's autocast; without its cast-weight cache under --cuda-graphs (a capture forbids it)."""
        return autocast(self.cfg, self.device, cache_enabled=not self.cfg.cuda_graphs)

    def _train_step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One optimisation step on a batch, its loss and accuracy added to train_totals; returns the loss."""
        with self._autocast():
            logits = self.train_model(images)
            loss = F.cross_entropy(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # DDP: gradients averaged over the ranks when it returns
        self.scaler.unscale_(self.optimizer)  # gradient flow sees true gradients
        self.recorder.accumulate()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.train_totals.add(loss.detach() * len(targets), logits, targets)
        return loss.detach()

    def _eval_step(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """The eval-mode model's summed loss and correct predictions on a batch, added to eval_totals."""
        with self._autocast():
            logits = self.model(images).float()
        self.eval_totals.add(F.cross_entropy(logits, targets, reduction="sum"), logits, targets)

    # --- loops -----------------------------------------------------------------------
    def _batches(self, loader, desc: str):
        """Yield (progress bar or loader, images, targets) on the device; tqdm (rank 0) unless --no-progress."""
        show = self.cfg.progress is not False and self.env.is_main
        bar = tqdm(loader, desc=desc, leave=False, disable=False if self.cfg.progress else None,
                   dynamic_ncols=True) if show else loader
        for images, targets in bar:
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            yield bar, images, targets.to(self.device, non_blocking=True)

    def _train_loader(self, epoch: int):
        """This epoch's training batches of this rank: they depend only on (seed, epoch, rank), not on --workers.

        The order comes from a generator seeded with (seed, epoch), or DistributedSampler's
        (seed, epoch) shuffle; every image's crop and flip from (seed, epoch, its index).
        """
        cfg, env = self.cfg, self.env
        self.splits.train.set_epoch(epoch)
        sampler = None
        if env.distributed:  # one shuffle of the whole split (same on every rank), rank r takes every r-th
            sampler = DistributedSampler(self.splits.train, env.world_size, env.rank, shuffle=True, seed=cfg.seed)
            sampler.set_epoch(epoch)
        return build_loader(self.splits.train, cfg.batch_size, train=True, workers=cfg.workers, device=self.device,
                            generator=epoch_generator(cfg.seed, epoch), sampler=sampler)

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training split (this rank's share); returns global loss/accuracy/throughput."""
        loader = self._train_loader(epoch)
        self.train_model.train()
        self.train_totals.zero_()
        seen, start = 0, time.perf_counter()
        for step, (bar, images, targets) in enumerate(self._batches(loader, f"epoch {epoch}/{self.cfg.epochs}")):
            loss = self.train_step(images, targets)
            self.recorder.count_step()
            seen += len(targets)
            if hasattr(bar, "set_postfix") and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")  # a host sync, every 20 steps only
        totals = self.train_totals
        loss_total, correct_total, seen_total = self._sum_over_ranks(totals.loss, totals.correct, seen)
        elapsed = time.perf_counter() - start
        return {"train_loss": loss_total / seen_total, "train_acc": 100.0 * correct_total / seen_total,
                "epoch_time_s": elapsed, "images_per_s": seen_total / elapsed}

    @torch.no_grad()
    def evaluate(self, dataset, desc: str) -> tuple[float, float]:
        """Mean cross-entropy and accuracy (%) of the model in eval mode over `dataset` (sharded over ranks)."""
        shard = rank_shard(dataset, self.env.rank, self.env.world_size)
        loader = build_loader(shard, self.cfg.batch_size, train=False, workers=self.cfg.workers, device=self.device)
        self.model.eval()
        self.eval_totals.zero_()
        for _, images, targets in self._batches(loader, desc):
            self.eval_step(images, targets)
        loss_total, correct_total = self._sum_over_ranks(self.eval_totals.loss, self.eval_totals.correct)
        return loss_total / len(dataset), 100.0 * correct_total / len(dataset)

    def _print(self, message: str) -> None:
        """Progress output: rank 0 only."""
        if self.env.is_main:
            print(message, flush=True)

    def run_epoch(self, epoch: int) -> tuple[dict, dict]:
        """Train and validate epoch `epoch`, step the schedule, update history and best; return its row and flow."""
        lr = self.optimizer.param_groups[0]["lr"]
        row = {"epoch": epoch, "lr": lr, "dataset": self.splits.kind, **self.train_epoch(epoch)}
        self._share_rank0_buffers()
        row["val_loss"], row["val_acc"] = self.evaluate(self.splits.val, "validation")
        self.landscape.record(epoch)  # at the lr the epoch trained with
        self.scheduler.step()
        flow = self.recorder.end_epoch(epoch)
        self.metrics.append({k: row[k] for k in METRIC_COLUMNS})
        self.epoch = epoch
        if row["val_acc"] > self.best["val_acc"]:
            self.best = {"epoch": epoch, "val_acc": row["val_acc"]}
            self.best_model = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        return row, flow

    def fit(self) -> dict:
        """Train the remaining epochs, then evaluate the best-validation checkpoint on the test set."""
        cfg = self.cfg
        while self.epoch < cfg.epochs:
            row, flow = self.run_epoch(self.epoch + 1)
            if self.env.is_main:
                self.run_dir.write_epoch(self.state_dict(), self.config_record(), self.splits.kind,
                                         cfg.keep_checkpoints)
            self._print(f"[{cfg.label}] epoch {self.epoch}/{cfg.epochs} lr {row['lr']:.2e} | train loss "
                        f"{row['train_loss']:.4f} acc {row['train_acc']:.2f}% | val loss {row['val_loss']:.4f} acc "
                        f"{row['val_acc']:.2f}% | {row['images_per_s']:.0f} img/s | gradients "
                        f"{flow['diagnosis']['status']}")
        return self.test()

    def test(self) -> dict:
        """Evaluate best.pt on the test split and write test.json."""
        self._barrier()  # rank 0 has finished writing best.pt before any rank reads it
        best = load_checkpoint(self.run_dir.best, BEST_KEYS)
        self.model.load_state_dict(best["model"])
        test_loss, test_acc = self.evaluate(self.splits.test, "test")
        result = {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "test_loss": test_loss,
                  "test_acc": test_acc, "dataset": self.splits.kind}
        if self.env.is_main:
            self.run_dir.write_test(result)
        self._print(f"[{self.cfg.label}] test loss {test_loss:.4f} acc {test_acc:.2f}% "
                    f"(best validation epoch {best['epoch']}) -> {self.run_dir.path}")
        return result


def check_ranks_agree(cfg: TrainConfig, epoch: int, env: DistEnv) -> None:
    """Fail unless every rank trains the same configuration from the same epoch.

    Ranks started with different options, or reading different files (a run directory
    that is not on a filesystem shared by all nodes), would otherwise train garbage or hang.
    """
    # compared as text: a value that is not equal to itself (nan) must not make ranks disagree
    mine = {"config": {k: repr(v) for k, v in cfg.identity().items()}, "epoch": epoch}
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
    Everything that can be checked is checked before data and model are built: the
    options, the run directory, the device and the memory the run needs.
    """
    env = DistEnv.from_environ() if env is None else env
    cfg, state = resume_state(cfg.validate(), explicit, env.world_size)
    cfg.validate()  # runtime options taken from the checkpoint meet the saved configuration
    device = setup_device(cfg, env)
    check_capturable(cfg, device, env.world_size)
    if cfg.channels_last is None:
        channels_last, why = choose_channels_last(device)
        cfg = replace(cfg, channels_last=channels_last)
        if env.is_main:
            print(f"[{cfg.label}] memory format: {'channels_last' if channels_last else 'contiguous'} (--channels-last "
                  f"unset: {why}; --channels-last or --no-channels-last to choose)", flush=True)
    if cfg.impl == "auto":
        impl, why = choose_impl(cfg, device)
        cfg = replace(cfg, impl=impl)
        if env.is_main:
            print(f"[{cfg.label}] layers: {impl} (--impl auto: {why}; --impl native or fused to choose)", flush=True)
    check_memory(cfg, device, env.world_size)
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
                trainer.restore_run_dir(state)
            else:
                trainer.run_dir.remove_temporaries()
            if cfg.sync_bn and not env.distributed:
                print("note: --sync-bn has no effect in a single process (BatchNorm already sees the whole batch)",
                      flush=True)
            if trainer.splits.kind == "synthetic":
                print(SYNTHETIC_BANNER, flush=True)
        return trainer.fit()


def resource_failure(err: BaseException, run_dir: Path) -> str | None:
    """One line for a full disk or exhausted memory, saying what is kept (None for any other error)."""
    if isinstance(err, WriteError):
        cause, fix = str(err), "space is freed"
    elif out_of_memory(err):
        cause, fix = f"out of memory ({str(err).splitlines()[0][:160]})", "--batch-size or --filters is smaller"
    else:
        return None
    kept = newest_epoch(run_dir)
    then = f"{kept} is intact; continue with --resume once" if kept else "no epoch was completed; run again once"
    return f"{cause}. {then} {fix}"


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
    except Exception as err:
        line = resource_failure(err, cfg.run_dir)
        if line is None:
            raise
        parser.exit(1, f"{parser.prog}: error: {prefix}{line}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
