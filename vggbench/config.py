"""The training configuration: one dataclass, its command line, and its validation.

Every field carries its help text, so `python -m vggbench.train --help` explains every
flag and `config.json` in a run directory records every resolved value.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vggbench.data import DATASETS, IMAGE_SIZE
from vggbench.models.units import ACTIVATIONS, NORM_POSITIONS
from vggbench.models.vgg import (
    IMPLS,
    VARIANTS,
    blocks_for_depth,
    model_label,
    parse_model_name,
)

OPTIMIZERS = ("adam", "sgd", "adamw")
SCHEDULERS = ("cosine", "cosine_restarts", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
# --impl auto: chosen at run start (vggbench.device.choose_impl), recorded resolved
IMPL_CHOICES = ("auto", *IMPLS)
# Options whose None means "chosen at run start" (vggbench.device.choose_channels_last), recorded
# resolved: a resumed run given None keeps its recorded choice.
CHOSEN_AT_START = ("channels_last",)
# Options that say where or how a run executes, not what it trains; they may change on
# --resume and do not distinguish configurations.
# impl is runtime too: both implementations compute the same model from the same
# state_dict, so a run may continue on the other one. sync_bn is NOT: BatchNorm statistics
# over the global batch instead of each rank's share change what is trained.
# cuda_graphs too: it replays the same step (vggbench.graphs), as impl computes the same model.
RUNTIME_OPTIONS = ("device", "impl", "workers", "progress", "out_dir", "data_dir", "download", "resume",
                   "dist_timeout", "landscape_every", "cuda_graphs")


# Bounds of the integer options. Counts beyond 2**31 - 1 are typos (and overflow C ints in
# torch); seeds must fit torch.manual_seed (64-bit), with room for per-epoch derivations.
INT_MAX = 2**31 - 1
SEED_MAX = 2**63 - 1
INT_RANGES = {
    "filters": (1, INT_MAX), "stages": (1, INT_MAX), "convs_per_block": (1, INT_MAX), "batch_size": (1, INT_MAX),
    "epochs": (1, INT_MAX), "restart_period": (1, INT_MAX), "synthetic_train_size": (1, INT_MAX),
    "synthetic_test_size": (1, INT_MAX), "dist_timeout": (1, INT_MAX), "val_size": (1, INT_MAX),
    "train_limit": (100, INT_MAX), "workers": (0, 256), "gradflow_every": (0, INT_MAX), "landscape_every": (0, INT_MAX),
    "keep_checkpoints": (0, INT_MAX), "seed": (0, SEED_MAX), "split_seed": (0, SEED_MAX),
}
FLOAT_MINIMA = {"lr": 0.0, "weight_decay": 0.0, "momentum": 0.0, "eta_min": 0.0, "negative_slope": 0.0}


class ConfigError(ValueError):
    """An impossible or inconsistent configuration; the message says what to change."""


# --help shows the options in these groups, in this order (each field names its group)
GROUPS = ("model", "data", "optimisation", "distributed", "execution", "output")


def opt(default, help: str, choices: tuple | None = None, *, group: str):
    """A config field with its help text, its --help group (and allowed values) for the command line."""
    assert group in GROUPS, group
    return field(default=default, metadata={"help": help, "choices": choices, "group": group})


@dataclass
class TrainConfig:
    """Everything one training run needs. Defaults are the study's protocol."""

    model: str = opt("vgg38", "model name vgg<depth>: vgg08 (7 convs + linear), vgg38 (37 convs + linear), "
                     "or any depth 8 + 6k (3 stages, 2 convs per block)", group="model")
    variant: str = opt("plain", "plain, bn (BatchNorm after every conv), rc (residual connections), "
                       "bn_rc (both)", tuple(VARIANTS), group="model")
    filters: int = opt(32, "channels of every conv", group="model")
    stages: int = opt(3, "stages (each ends with an average-pool reduction block)", group="model")
    convs_per_block: int = opt(2, "convs per processing/reduction block", group="model")
    residual_reduction: bool = opt(False, "also give reduction blocks a shortcut (1x1 stride-2 projection, "
                                   "+BN in BN variants): a studied extension", group="model")
    activation: str = opt("leaky_relu", "activation after every conv", ACTIVATIONS, group="model")
    negative_slope: float = opt(0.01, "LeakyReLU negative slope (0 gives ReLU)", group="model")
    bn_position: str = opt("before", "BatchNorm before the activation (the study) or after it", NORM_POSITIONS,
                           group="model")
    impl: str = opt("auto", "layers: native PyTorch, or the fused conv->BN->act C++/CUDA op "
                    "(same weights and checkpoints), or auto: fused where it is the faster (on the CPU "
                    "with --channels-last, fp32 and the Winograd kernels), else native", IMPL_CHOICES,
                    group="model")
    dataset: str = opt("cifar100", "cifar100 (torchvision's CIFAR100 from --data-dir) or synthetic "
                       "(deterministic learnable stand-in with CIFAR-100's shapes)", DATASETS, group="data")
    data_dir: str = opt("data", "directory holding cifar-100-python/ (or where --download puts it)", group="data")
    download: bool = opt(False, "download CIFAR-100 into --data-dir if it is missing", group="data")
    verify_checksums: bool = opt(True, "check the MD5 sums of the official CIFAR-100 files "
                                 "(turn off for custom data in the same format)", group="data")
    val_size: int = opt(2500, "validation images carved class-balanced from the training set "
                        "(a multiple of 100; the study: 2500 of 50000)", group="data")
    split_seed: int = opt(0, "seed of the train/validation split (independent of --seed)", group="data")
    train_limit: int | None = opt(None, "use only this many training images, class-balanced "
                                  "(a multiple of 100; for short runs)", group="data")
    synthetic_train_size: int = opt(5000, "synthetic dataset: training images (incl. validation)", group="data")
    synthetic_test_size: int = opt(1000, "synthetic dataset: test images", group="data")
    augment: bool = opt(True, "training augmentation: RandomCrop(32, padding=4) + horizontal flip", group="data")
    optimizer: str = opt("adam", "optimiser (the study: adam)", OPTIMIZERS, group="optimisation")
    lr: float = opt(1e-3, "learning rate", group="optimisation")
    weight_decay: float = opt(0.0, "weight decay (L2 for adam/sgd, decoupled for adamw)", group="optimisation")
    momentum: float = opt(0.9, "SGD momentum (sgd only)", group="optimisation")
    batch_size: int = opt(100, "images per step and PER RANK: a distributed run of N ranks takes global "
                          "batches of N x this (the study's 100 on 2 ranks: --batch-size 50); lr is not scaled",
                          group="optimisation")
    epochs: int = opt(100, "training epochs", group="optimisation")
    scheduler: str = opt("cosine", "cosine: CosineAnnealingLR(T_max=epochs); cosine_restarts: SGDR "
                         "with a restart every --restart-period epochs; none: constant lr", SCHEDULERS,
                         group="optimisation")
    eta_min: float = opt(2e-5, "minimum learning rate of the cosine schedules", group="optimisation")
    restart_period: int = opt(50, "epochs between warm restarts (cosine_restarts)", group="optimisation")
    seed: int = opt(7112018, "seed of initialisation, shuffling and augmentation", group="optimisation")
    sync_bn: bool = opt(False, "distributed runs: BatchNorm statistics over the global batch (SyncBatchNorm "
                        "semantics) instead of each rank's share; no effect in a single process", group="distributed")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (cuda when available)", group="execution")
    channels_last: bool | None = opt(None, "channels_last memory format for model and inputs, or contiguous "
                                     "(--no-channels-last); unset: channels_last on the CPU, where it is the faster "
                                     "(and the fused op needs it), contiguous elsewhere", group="execution")
    precision: str = opt("fp32", "fp32, or mixed precision: bf16 (CPU or CUDA), fp16 (CUDA, "
                         "with gradient scaling)", PRECISIONS, group="execution")
    workers: int = opt(2, "DataLoader worker processes (0 loads in the main process)", group="execution")
    deterministic: bool = opt(False, "deterministic algorithms only (exact resume on CPU)", group="execution")
    cuda_graphs: bool = opt(False, "capture the training step (forward, backward, optimiser step, gradient-flow "
                            "recording) and the evaluation forward in CUDA graphs and replay them per batch: "
                            "no launch overhead, no host sync per step (one CUDA process, fp32 or bf16)",
                            group="execution")
    gradflow_every: int = opt(0, "also record gradient flow averaged over windows of N steps "
                              "(0: per epoch only)", group="output")
    landscape_every: int = opt(0, "every N epochs, probe the loss landscape along the gradient on a fixed batch "
                               "(loss band, gradient predictiveness, effective beta-smoothness; Santurkar et al. "
                               "2018) into landscape.json; training is unchanged (0: off)", group="output")
    dist_timeout: int = opt(300, "distributed runs: seconds a rank waits for the others in a collective before "
                            "failing (waiting for rank 0 to prepare the data has its own 30 min)", group="distributed")
    keep_checkpoints: int = opt(2, "epoch checkpoints to keep (0 keeps all); best.pt is always kept", group="output")
    out_dir: str | None = opt(None, "run directory (default: runs/<model>-<variant>-lr<lr>-seed<seed>)", group="output")
    resume: str | None = opt(None, "continue the run in --out-dir from its newest checkpoint "
                             "(--resume) or from one of its checkpoint files (--resume PATH)", group="output")
    progress: bool | None = opt(None, "tqdm progress bars (default: only on a terminal)", group="output")

    @property
    def label(self) -> str:
        """The study's name for this configuration, e.g. "VGG38 BN+RC"."""
        return model_label(self.model, self.variant)

    @property
    def run_dir(self) -> Path:
        """Where this run writes its files."""
        if self.out_dir:
            return Path(self.out_dir)
        return Path("runs") / f"{self.model}-{self.variant}-lr{self.lr:g}-seed{self.seed}"

    def identity(self) -> dict:
        """The fields that define what is trained (all but RUNTIME_OPTIONS)."""
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_OPTIONS}

    def runtime(self) -> dict:
        """The fields that say where and how the run executes (RUNTIME_OPTIONS)."""
        return {k: getattr(self, k) for k in RUNTIME_OPTIONS}

    def model_spec(self) -> dict:
        """The keyword arguments of vggbench.models.build_model for this config's model
        (`impl` auto, unresolved outside a run: the native layers, same parameters)."""
        return {"name": self.model, "variant": self.variant, "filters": self.filters, "stages": self.stages,
                "convs_per_block": self.convs_per_block, "residual_reduction": self.residual_reduction,
                "activation": self.activation, "negative_slope": self.negative_slope,
                "bn_position": self.bn_position, "impl": self.impl if self.impl in IMPLS else "native"}

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the first impossible value; return self. The model's depth
        is checked last: it needs valid --stages and --convs-per-block."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"--{flag(f.name)} must be one of {', '.join(choices)}, "
                                  f"got {getattr(self, f.name)!r}")
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                bound = f">= {low}" if value < low else f"<= {high}"
                raise ConfigError(f"--{flag(name)} must be {bound}, got {value}")
        for name, low in FLOAT_MINIMA.items():
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ConfigError(f"--{flag(name)} must be a finite number, got {value}")
            if value < low:
                raise ConfigError(f"--{flag(name)} must be >= {low:g}, got {value:g}")
        if self.lr == 0:
            raise ConfigError("--lr must be > 0")
        if self.momentum > 1:
            raise ConfigError(f"--momentum must be <= 1, got {self.momentum:g}")
        if self.scheduler != "none" and self.eta_min > self.lr:
            raise ConfigError(f"--eta-min ({self.eta_min:g}) must not exceed --lr ({self.lr:g})")
        if IMAGE_SIZE >> self.stages < 1:
            raise ConfigError(f"--stages {self.stages}: every stage halves the {IMAGE_SIZE}x{IMAGE_SIZE} images, so "
                              f"at most {IMAGE_SIZE.bit_length() - 1} stages fit")
        try:
            blocks_for_depth(parse_model_name(self.model), self.stages, self.convs_per_block)
        except ValueError as err:
            raise ConfigError(f"--model: {err}") from None
        if self.impl == "fused":
            self._check_fusable()
        return self

    def _check_fusable(self) -> None:
        """--impl fused covers BN before a LeakyReLU, and needs the built extension."""
        if self.activation != "leaky_relu" or self.bn_position != "before":
            raise ConfigError("--impl fused computes conv -> BN -> LeakyReLU; --activation sigmoid and "
                              "--bn-position after need --impl native")
        try:
            import vggbench.ops  # noqa: F401
        except ImportError as err:
            raise ConfigError(str(err)) from None


def flag(name: str) -> str:
    """Command-line spelling of a field name: batch_size -> batch-size."""
    return name.replace("_", "-")


def option_argv(name: str, value: Any) -> list[str]:
    """Command-line tokens giving field `name` the value `value`: booleans as --flag / --no-flag."""
    if isinstance(value, bool):
        return [f"--{'' if value else 'no-'}{flag(name)}"]
    return [f"--{flag(name)}", str(value)]


def add_config_arguments(parser: argparse.ArgumentParser, suppress_defaults: bool = False) -> None:
    """Add one option per TrainConfig field (with its help text) to `parser`.

    With `suppress_defaults`, options not given are left out of the parsed namespace
    (used to tell which options the user gave explicitly).
    """
    groups = {name: parser.add_argument_group(f"{name} options") for name in GROUPS}
    for f in fields(TrainConfig):
        default = argparse.SUPPRESS if suppress_defaults else f.default
        kwargs: dict = {"dest": f.name, "default": default, "help": f.metadata["help"]}
        if f.name == "resume":
            kwargs.update(nargs="?", const="latest", metavar="PATH")
        elif f.type in ("bool", "bool | None"):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {"int": int, "float": float, "int | None": int}.get(f.type, str)
            if f.metadata["choices"]:
                kwargs["choices"] = f.metadata["choices"]
        if f.default is not None and "action" not in kwargs:
            kwargs["help"] += f" (default: {f.default})"
        groups[f.metadata["group"]].add_argument(f"--{flag(f.name)}", **kwargs)


def explicit_options(argv: list[str] | None) -> set[str]:
    """Names of the config fields given explicitly on the command line (not defaults)."""
    probe = argparse.ArgumentParser(add_help=False)
    add_config_arguments(probe, suppress_defaults=True)
    return set(vars(probe.parse_known_args(argv)[0]))
