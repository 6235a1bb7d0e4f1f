"""The device and numerics a run uses: --device, --precision, --deterministic, --channels-last,
and which layers compute them (--impl auto)."""

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


def choose_impl(cfg: TrainConfig, device: torch.device) -> tuple[str, str]:
    """--impl auto: ("fused", why) where the fused op is the faster, else ("native", why).

    Faster, as measured by the benchmarks: on the CPU, where its 3x3 convs run as Winograd (an
    AVX2+FMA or AVX-512 CPU), in fp32 and in bf16 (VGG38 BN+RC under bf16 autocast, batch 100,
    on a 2-core AMD EPYC Zen 4 with AVX512-BF16: fused 0.77x native's step time; native bf16
    without AVX512-BF16 is slower still) except on a CPU with AMX-BF16, whose bf16 convs the
    fused op leaves to ATen. Channels_last, or contiguous, whose convs run on channels_last
    copies (VGG38 BN+RC, fp32, batch 100, AMD EPYC Zen 3: fused 0.47x native contiguous's step
    time), except in bf16 where ATen's bf16 convs have bf16 dot products: there the copies
    would take much of the fused op's smaller gain (not measured). fp16 goes through ATen's
    convs and gains nothing; the CUDA op is kept for explicit choice.
    """
    if device.type != "cpu":
        return "native", f"on {device.type} the fused op is not the faster; --impl fused uses it"
    if cfg.precision not in ("fp32", "bf16"):
        return "native", f"--precision {cfg.precision}: the fused op's convs are fast in fp32 and bf16 only"
    if cfg.activation != "leaky_relu" or cfg.bn_position != "before":
        return "native", "the fused op computes conv -> BN -> LeakyReLU only"
    try:
        from vggbench import ops  # noqa: F401  (loads the extension: torch.ops.vggbench.*)
    except ImportError:
        return "native", "the C++ extension is not built"
    isa = torch.ops.vggbench.winograd_isa()
    if isa == "none":
        return "native", "this CPU has no AVX2+FMA for the fused op's Winograd convs"
    if cfg.precision == "bf16" and not torch.ops.vggbench.winograd_takes_bfloat16():
        return "native", "--precision bf16 on a CPU with AMX-BF16: ATen's bf16 convs are the faster there"
    if not cfg.channels_last and cfg.precision == "bf16" and torch.ops.vggbench.native_bf16_dot_products():
        return "native", ("--no-channels-last with --precision bf16 on a CPU with bf16 dot products: the fused op "
                          "is measured faster there only in channels_last")
    layout = "channels_last" if cfg.channels_last else "contiguous through channels_last copies"
    return "fused", f"Winograd convs on {isa.upper()}, {layout}, {cfg.precision}"


def choose_channels_last(device: torch.device) -> tuple[bool, str]:
    """--channels-last unset: (True, why) on the CPU, else (False, why).

    On the CPU channels_last is the faster, as measured (same-run step times of VGG38 BN+RC,
    batch 100, on a 2-core AVX-512 Xeon): the fused op's (its Winograd convs compute in it)
    0.64-0.79x contiguous's, native bf16's 0.34-0.69x, native fp32's 0.78-0.91x in two of three
    runs. On CUDA
    it is not measured faster in fp32: contiguous, the layout a run had before.
    """
    if device.type == "cpu":
        return True, "the faster on the CPU, where the fused op's Winograd convs compute in it"
    return False, f"on {device.type} channels_last is not measured faster"


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    """channels_last with --channels-last, else contiguous."""
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def autocast(cfg: TrainConfig, device: torch.device, cache_enabled: bool = True):
    """The autocast context of --precision (a no-op for fp32); a CUDA graph's capture needs
    `cache_enabled=False` (no cast weights kept across calls)."""
    dtype = AUTOCAST_DTYPES.get(cfg.precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=cache_enabled)
