"""How the benchmark suite times and what its report says about the GPU (vggbench/bench/timing.py,
machine.py, markdown.py; vggbench/nvidia_smi.py): the CPU path here, the CUDA path on a GPU."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vggbench import nvidia_smi
from vggbench.bench import markdown
from vggbench.bench.results import Results
from vggbench.bench.timing import CudaEventClock, L2Flush, device_timing, interleaved, time_once

ROOT = Path(__file__).resolve().parents[1]
# `nvidia-smi --query-gpu=uuid,<nvidia_smi.FIELDS> --format=csv,noheader` on a two-GPU machine
SMI_TWO_GPUS = """\
GPU-5e2c0a7e-1f3b-4c2d-9a8b-7c6d5e4f3a21, 550.54.15, P0, 1980 MHz, 1980 MHz, 2619 MHz, 2619 MHz, 700.00 W
GPU-0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e, 550.54.15, P8, 345 MHz, 1980 MHz, 2619 MHz, 2619 MHz, 700.00 W
"""
H100 = {"gpu": "NVIDIA H100 80GB HBM3", "gpu_capability": "9.0", "gpu_sms": 132, "gpu_l2_mib": 50.0,
        "gpu_memory_gib": 79.1, "cuda": "13.0", "cudnn": 91300}


def test_cpu_rounds_are_timed_by_perf_counter_without_setup():
    timing = device_timing(torch.device("cpu"))
    assert timing.clock is time.perf_counter and timing.setup is None and timing.name == "time.perf_counter"
    calls = []
    assert time_once(lambda: calls.append(1), timing) >= 0 and calls == [1]
    setup, seconds = interleaved(lambda: calls.append(2), timing)
    setup(), setup()
    assert calls == [1, 2, 2] and len(seconds) == 2 and all(s >= 0 for s in seconds)
    with pytest.raises(ValueError, match="L2 flush between rounds is for CUDA devices"):
        device_timing(torch.device("cpu"), l2_flush=True)


def test_l2_flush_without_cuda_is_a_clear_error(tmp_path):
    run = subprocess.run([sys.executable, "-m", "vggbench.bench", "--l2-flush", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, check=False, timeout=300)
    assert run.returncode == 2
    assert "--l2-flush flushes a GPU's L2 cache between rounds: use it with --device cuda" in run.stderr


@pytest.mark.parametrize(("uuid", "pstate"), [
    ("5e2c0a7e-1f3b-4c2d-9a8b-7c6d5e4f3a21", "P0"),  # torch's spelling
    ("GPU-0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e", "P8"),  # nvidia-smi's
    ("ffffffff-0000-0000-0000-000000000000", None),  # not listed: none of the two
    (None, None),  # which one is meant?
])
def test_nvidia_smi_rows_are_picked_by_uuid(uuid, pstate):
    row = nvidia_smi.parse(SMI_TWO_GPUS, nvidia_smi.FIELDS, uuid)
    assert (row and row["pstate"]) == pstate
    if row:
        assert row["driver_version"] == "550.54.15" and row["clocks.max.sm"] == "1980 MHz"


def test_nvidia_smi_single_gpu_and_absent(monkeypatch, tmp_path):
    only = SMI_TWO_GPUS.splitlines()[1]
    assert nvidia_smi.parse(only, nvidia_smi.FIELDS)["clocks.sm"] == "345 MHz"
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi there
    assert nvidia_smi.query() is None


def report_machine(machine: dict, settings: dict) -> str:
    results = Results([], [], [], [], [], [], machine=machine, settings=settings, datetime="")
    return "\n".join(markdown.machine_section(results))


def test_report_names_the_gpu_its_clocks_and_how_rounds_were_timed():
    smi = nvidia_smi.parse(SMI_TWO_GPUS.splitlines()[0], nvidia_smi.FIELDS)
    machine = {"cpu_model": "AMD EPYC", **H100,
               **{f"nvidia_smi_{field.replace('.', '_')}": value for field, value in smi.items()}}
    text = report_machine(machine, {"device": "cuda", "timer": "CUDA events", "l2_flush": True})
    assert ("GPU: NVIDIA H100 80GB HBM3 (compute capability 9.0, 132 SMs, 50.0 MiB L2, 79.1 GiB); "
            "SM clock 1980 MHz (max 1980 MHz), memory clock 2619 MHz (max 2619 MHz), power limit 700.00 W, P0; "
            "driver 550.54.15; CUDA 13.0, cuDNN 91300.") in text
    assert "Rounds timed with CUDA events" in text and "the L2 cache flushed before every round" in text
    assert "| suite timer | CUDA events |" in text and "| nvidia_smi_driver_version | 550.54.15 |" in text
    text = report_machine({**H100, "nvidia_smi": "not available"}, {"timer": "CUDA events", "l2_flush": False})
    assert "nvidia-smi not available" in text and "no L2 flush" in text


def test_cpu_report_has_no_gpu_line():
    text = report_machine({"cpu_model": "AMD EPYC"}, {"device": "cpu", "timer": "time.perf_counter"})
    assert "GPU:" not in text and "Rounds timed with" not in text


@pytest.mark.cuda
def test_cuda_rounds_are_timed_by_events_after_a_flush_and_a_sync():
    """The clock reads GPU time: monotonic, and a round of real work takes some; the flush
    overwrites more than the L2 cache; the setup leaves no work queued."""
    device = torch.device("cuda")
    timing = device_timing(device, l2_flush=True)
    assert isinstance(timing.clock, CudaEventClock) and timing.name == "CUDA events"
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    assert L2Flush(device).buffer.numel() >= 2 * l2 > 0
    x = torch.randn(2048, 2048, device=device)
    readings = [timing.clock() for _ in range(3)]
    assert readings == sorted(readings)
    assert time_once(lambda: x @ x, timing) > 0
    setup, seconds = interleaved(lambda: x @ x, timing)
    setup()
    assert len(seconds) == 1 and seconds[0] > 0 and torch.cuda.current_stream(device).query()
