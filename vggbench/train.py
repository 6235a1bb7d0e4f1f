"""Train one model of the study: `python -m vggbench.train --model vgg38 --variant bn_rc`.

One run directory per run (see README, "Outputs"): config.json, metrics.jsonl,
summary.csv, gradflow.json, checkpoints/, and test.json once the best-validation
checkpoint has been evaluated on the test set. `--resume` continues a run exactly.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
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
from vggbench.config import RUNTIME_OPTIONS, ConfigError, TrainConfig, add_config_arguments, explicit_options, flag
from vggbench.data import DataError, build_loader, build_splits
from vggbench.gradflow import GradientFlowRecorder
from vggbench.models import VGG, build_model

METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "images_per_s",
                  "dataset")
RUN_FACTS = ("label", "num_params", "torch", "resolved_device")  # what config.json adds to the config
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


class Trainer:
    """Owns one run: model, optimiser, data, history; trains epochs and evaluates."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        torch.manual_seed(cfg.seed)
        try:
            self.splits = build_splits(
                cfg.dataset, cfg.data_dir, download=cfg.download, verify_checksums=cfg.verify_checksums,
                val_size=cfg.val_size, split_seed=cfg.split_seed, train_limit=cfg.train_limit,
                synthetic_train_size=cfg.synthetic_train_size, synthetic_test_size=cfg.synthetic_test_size,
                synthetic_seed=cfg.split_seed, augment=cfg.augment,
            )
        except ValueError as err:  # sizes the data cannot be split into
            raise ConfigError(f"data: {err}") from None
        self.model = make_model(cfg).to(device, memory_format=self.memory_format)
        self.optimizer = make_optimizer(cfg, self.model)
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.recorder = GradientFlowRecorder(self.model, window=cfg.gradflow_every)
        self.metrics: list[dict] = []
        self.best = {"epoch": 0, "val_acc": -1.0}
        self.epoch = 0

    # --- state -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue after the current epoch (tensors and plain data only)."""
        return {
            "epoch": self.epoch, "config": self.cfg.identity(), "runtime": self.cfg.runtime(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": {"metrics": self.metrics, "gradflow": self.recorder.state_dict(), "best": self.best},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()` (from a checkpoint loaded with weights_only=True)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.recorder.load_state_dict(state["history"]["gradflow"])
        self.metrics = list(state["history"]["metrics"])
        self.best = dict(state["history"]["best"])
        self.epoch = state["epoch"]

    # --- files -----------------------------------------------------------------------
    def write_config(self) -> None:
        """config.json: the resolved config plus label, #params, torch version and device."""
        num_params = sum(p.numel() for p in self.model.parameters())
        info = dict(zip(RUN_FACTS, (self.cfg.label, num_params, torch.__version__, str(self.device))))
        atomic_write_json(self.run_dir / "config.json", {**asdict(self.cfg), **info})

    def write_history(self) -> None:
        """Rewrite metrics.jsonl, summary.csv and gradflow.json from the in-memory history."""
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics))
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=METRIC_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.metrics)
        atomic_write_text(self.run_dir / "summary.csv", table.getvalue())
        atomic_write_json(self.run_dir / "gradflow.json", {"dataset": self.splits.kind, **self.recorder.state_dict()})

    # --- loops -----------------------------------------------------------------------
    def _batches(self, loader, desc: str):
        """Yield (progress bar or loader, images, targets) on the device; tqdm unless --no-progress."""
        bar = tqdm(loader, desc=desc, leave=False, disable=False if self.cfg.progress else None,
                   dynamic_ncols=True) if self.cfg.progress is not False else loader
        for images, targets in bar:
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            yield bar, images, targets.to(self.device, non_blocking=True)

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training split; returns loss/accuracy/throughput."""
        cfg = self.cfg
        epoch_seed = cfg.seed * 1000 + epoch  # shuffling and augmentation depend only on (seed, epoch)
        torch.manual_seed(epoch_seed)
        loader = build_loader(self.splits.train, cfg.batch_size, train=True, workers=cfg.workers,
                              device=self.device, generator=torch.Generator().manual_seed(epoch_seed))
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen, start = 0, time.perf_counter()
        for step, (bar, images, targets) in enumerate(self._batches(loader, f"epoch {epoch}/{cfg.epochs}")):
            with self._autocast():
                logits = self.model(images)
                loss = F.cross_entropy(logits.float(), targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # gradient flow sees true gradients
            self.recorder.record()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss_sum += loss.detach() * len(targets)
            correct += (logits.argmax(1) == targets).sum()
            seen += len(targets)
            if hasattr(bar, "set_postfix") and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")  # a host sync, every 20 steps only
        elapsed = time.perf_counter() - start
        return {"train_loss": loss_sum.item() / seen, "train_acc": 100.0 * correct.item() / seen,
                "epoch_time_s": elapsed, "images_per_s": seen / elapsed}

    @torch.no_grad()
    def evaluate(self, dataset, desc: str) -> tuple[float, float]:
        """Mean cross-entropy and accuracy (%) of the model in eval mode over `dataset`."""
        loader = build_loader(dataset, self.cfg.batch_size, train=False, workers=self.cfg.workers,
                              device=self.device)
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for _, images, targets in self._batches(loader, desc):
            with self._autocast():
                logits = self.model(images).float()
            loss_sum += F.cross_entropy(logits, targets, reduction="sum")
            correct += (logits.argmax(1) == targets).sum()
        return loss_sum.item() / len(dataset), 100.0 * correct.item() / len(dataset)

    def fit(self) -> dict:
        """Train the remaining epochs, then evaluate the best-validation checkpoint on the test set."""
        cfg = self.cfg
        while self.epoch < cfg.epochs:
            epoch = self.epoch + 1
            lr = self.optimizer.param_groups[0]["lr"]
            row = {"epoch": epoch, "lr": lr, "dataset": self.splits.kind, **self.train_epoch(epoch)}
            row["val_loss"], row["val_acc"] = self.evaluate(self.splits.val, "validation")
            self.scheduler.step()
            flow = self.recorder.end_epoch(epoch)
            self.metrics.append({k: row[k] for k in METRIC_COLUMNS})
            self.epoch = epoch
            improved = row["val_acc"] > self.best["val_acc"]
            if improved:
                self.best = {"epoch": epoch, "val_acc": row["val_acc"]}
            self.write_history()
            save_epoch_checkpoint(self.state_dict(), self.ckpt_dir, cfg.keep_checkpoints)
            if improved:
                save_best({"epoch": epoch, "val_acc": row["val_acc"], "config": cfg.identity(),
                           "model": self.model.state_dict()}, self.ckpt_dir)
            print(f"[{cfg.label}] epoch {epoch}/{cfg.epochs} lr {lr:.2e} | train loss {row['train_loss']:.4f} "
                  f"acc {row['train_acc']:.2f}% | val loss {row['val_loss']:.4f} acc {row['val_acc']:.2f}% | "
                  f"{row['images_per_s']:.0f} img/s | gradients {flow['diagnosis']['status']}", flush=True)
        return self.test()

    def test(self) -> dict:
        """Evaluate best.pt on the test split and write test.json."""
        best = load_checkpoint(self.ckpt_dir / "best.pt", required=("format", "epoch", "model"))
        self.model.load_state_dict(best["model"])
        test_loss, test_acc = self.evaluate(self.splits.test, "test")
        result = {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "test_loss": test_loss,
                  "test_acc": test_acc, "dataset": self.splits.kind}
        atomic_write_json(self.run_dir / "test.json", result)
        print(f"[{self.cfg.label}] test loss {test_loss:.4f} acc {test_acc:.2f}% "
              f"(best validation epoch {best['epoch']}) -> {self.run_dir}", flush=True)
        return result


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """Deterministic algorithms when asked (needed for bit-exact resume on GPUs); else fast cuDNN autotuning."""
    if deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def resume_state(cfg: TrainConfig, explicit: set[str] | None) -> tuple[TrainConfig, dict | None]:
    """The config and checkpoint to continue from (or `cfg`, None for a fresh run).

    A resumed run keeps its saved configuration: options that change what is trained
    may not be given with a different value (`explicit`: the options the user typed;
    None checks them all). Runtime options (device, workers, data dir, ...) not typed
    are taken from the checkpoint. Starting afresh over existing checkpoints is refused.
    """
    ckpt_dir = cfg.run_dir / "checkpoints"
    if not cfg.resume:
        if epoch_checkpoints(ckpt_dir):
            raise ConfigError(f"{cfg.run_dir} already holds a run's checkpoints: continue it with --resume, "
                              "or choose another --out-dir")
        return cfg, None
    path = newest_checkpoint(ckpt_dir) if cfg.resume == "latest" else Path(cfg.resume)
    state = load_checkpoint(path)
    saved, given = state["config"], cfg.identity()
    unknown = set(saved) - set(given)
    if unknown:
        raise CheckpointError(f"checkpoint {path} has config keys this vggbench does not know: {sorted(unknown)}")
    checked = given.keys() if explicit is None else explicit - set(RUNTIME_OPTIONS)
    changed = [f"--{flag(k)} {given[k]!r} (run has {saved[k]!r})" for k in checked if saved.get(k) != given[k]]
    if changed:
        raise ConfigError(f"cannot change a run's configuration on --resume: {'; '.join(changed)}. "
                          "Start a new run in another --out-dir instead")
    typed = set(RUNTIME_OPTIONS) if explicit is None else explicit | {"out_dir", "resume"}
    runtime = {k: v if k in typed else state["runtime"].get(k, v) for k, v in cfg.runtime().items()}
    return TrainConfig(**{**given, **saved, **runtime}), state


def train(cfg: TrainConfig, explicit: set[str] | None = None) -> dict:
    """Run (or resume) the training `cfg` describes; return the test result of its best checkpoint."""
    cfg, state = resume_state(cfg.validate(), explicit)
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    configure_determinism(cfg.deterministic, device)
    trainer = Trainer(cfg, device)
    if state is not None:
        trainer.load_state_dict(state)
        print(f"[{cfg.label}] resuming {cfg.run_dir} after epoch {trainer.epoch}", flush=True)
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
    """Entry point; bad input exits with status 2 and a one-line explanation."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = TrainConfig(**vars(args))
    try:
        train(cfg, explicit_options(argv if argv is not None else sys.argv[1:]))
    except (ConfigError, CheckpointError, DataError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"\ninterrupted: completed epochs are checkpointed; continue with "
                         f"{parser.prog} --out-dir {cfg.run_dir} --resume\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
