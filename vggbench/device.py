"""The device and numerics a run uses: --device, --precision, --deterministic, --channels-last."""

from __future__ import annotations

import os

import torch

from vggbench.config import ConfigError, TrainConfig
from vggbench.distributed import DistEnv, rank_device

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """Deterministic algorithms when asked (needed for bit-exact resume on GPUs); else fast cuDNN autotuning."""
    if deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def setup_device(cfg: TrainConfig, env: DistEnv) -> torch.device:
    """This rank's device for `cfg`, with its precision checked and determinism configured."""
    device = rank_device(resolve_device(cfg.device), env)
    check_precision(cfg.precision, device)
    configure_determinism(cfg.deterministic, device)
    return device


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    """channels_last with --channels-last, else contiguous."""
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def autocast(cfg: TrainConfig, device: torch.device):
    """The autocast context of --precision (a no-op for fp32)."""
    dtype = AUTOCAST_DTYPES.get(cfg.precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
