"""Machine and software information for the benchmark report."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from vggbench import nvidia_smi


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def vector_extensions(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The CPU's vector instruction sets from its Linux flags (avx*, fma, amx*), sorted; [] where unknown."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                return sorted(f for f in value.split() if f.startswith(("avx", "fma", "amx")))
    except OSError:
        pass
    return []


def instruction_sets() -> dict[str, object]:
    """What decides the CPU kernels: the CPU's vector extensions, ATen's capability, the
    Winograd kernels' path (VGGBENCH_CPU_ISA and ATEN_CPU_CAPABILITY may narrow the last two),
    and whether ATen's bfloat16 convs have bfloat16 dot products (AVX512-BF16 or AMX-BF16,
    unless ONEDNN_MAX_CPU_ISA caps oneDNN below them): the bfloat16 target's condition."""
    from vggbench import ops  # noqa: F401  (loads the extension: torch.ops.vggbench.*)

    return {"cpu_vector_extensions": " ".join(vector_extensions()) or "unknown",
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "winograd_isa": torch.ops.vggbench.winograd_isa(),
            "native_bf16_dot_products": torch.ops.vggbench.native_bf16_dot_products()}


def collect(device: torch.device) -> dict[str, object]:
    """CPU model, its instruction sets and cores, torch threads, Python/torch/torchvision versions,
    and on CUDA the GPU, its clocks and driver (`gpu`)."""
    import torchvision

    info: dict[str, object] = {
        "cpu_model": cpu_model(),
        **instruction_sets(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info |= gpu(device)
    return info


def gpu(device: torch.device) -> dict[str, object]:
    """The GPU (name, capability, SMs, L2, memory, clocks as the CUDA runtime reports them), torch's
    CUDA and cuDNN versions, and where nvidia-smi is present the driver and the current and
    maximum clocks (MHz), power limit and performance state."""
    props = torch.cuda.get_device_properties(device)
    info: dict[str, object] = {
        "gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}", "gpu_sms": props.multi_processor_count,
        "gpu_l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
    }
    for field in ("clock_rate", "memory_clock_rate"):  # kHz (the runtime's clockRate), where torch has them
        if hasattr(props, field):
            info[f"gpu_{field}_mhz"] = getattr(props, field) // 1000
    smi = nvidia_smi.query(uuid=str(getattr(props, "uuid", "")) or None)
    info |= {f"nvidia_smi_{field.replace('.', '_')}": value for field, value in (smi or {}).items()}
    if smi is None:
        info["nvidia_smi"] = "not available"
    return info
