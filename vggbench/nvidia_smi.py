"""What nvidia-smi reports about a GPU (driver, clocks, power), for reports; no torch import,
so vggbench.gpu_check can use it before it knows which Python has torch."""

from __future__ import annotations

import shutil
import subprocess

# nvidia-smi --query-gpu field names
FIELDS = ("driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem", "power.limit")


def parse(csv: str, fields: tuple[str, ...], uuid: str | None = None) -> dict[str, str] | None:
    """One GPU's `fields` from `nvidia-smi --query-gpu=uuid,<fields> --format=csv,noheader` output:
    the GPU with `uuid` (torch's spelling, with or without "GPU-"), else the only GPU listed."""
    rows = [dict(zip(("uuid", *fields), (value.strip() for value in line.split(","))))
            for line in csv.splitlines() if line.strip()]
    if uuid is not None:
        wanted = "GPU-" + str(uuid).removeprefix("GPU-")
        row = next((row for row in rows if row["uuid"] == wanted), None)
        if row is not None:
            return {field: row[field] for field in fields}
    return {field: rows[0][field] for field in fields} if len(rows) == 1 else None


def query(fields: tuple[str, ...] = FIELDS, uuid: str | None = None) -> dict[str, str] | None:
    """`fields` of the GPU with `uuid` (else of the only GPU) as nvidia-smi reports them, or None
    where nvidia-smi is absent, fails, or cannot tell which GPU is meant."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    command = [executable, f"--query-gpu=uuid,{','.join(fields)}", "--format=csv,noheader"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse(done.stdout, fields, uuid) if done.returncode == 0 else None
