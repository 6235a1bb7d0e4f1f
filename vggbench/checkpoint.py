"""Checkpoints: atomic writes, safe loads, and the files of a run directory.

Layout: RUN/checkpoints/epoch-NNNN.pt (the newest `keep` of them) and best.pt.
Every file is written to a temporary name, flushed to disk and renamed over the
target, so a crash leaves either the old or the new file, never a torn one. Loading
uses torch.load(weights_only=True): checkpoints hold only tensors and plain data.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "epoch", "config", "runtime", "model", "optimizer", "scheduler", "history")
_EPOCH_FILE = re.compile(r"epoch-(\d+)\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the run; the message says what to do."""


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) until the block has finished, then deliver it.

    A write is then never abandoned half-way, which would leave a stray temporary file
    and an error from deep inside torch.save instead of a clean KeyboardInterrupt.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be changed from the main thread
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(*received[0])


def atomic_write(path: Path, write) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, fsync, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with interrupts_deferred():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from other users
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write a JSON file atomically (indented, for people to read)."""
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def epoch_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The run's epoch checkpoints, oldest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).iterdir() if (m := _EPOCH_FILE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict, path: Path) -> Path:
    """Write `state` (tensors and plain data) with the format version, atomically."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT_VERSION, **state}, f))
    return path


def save_epoch_checkpoint(state: dict, ckpt_dir: Path, keep: int) -> Path:
    """Write epoch-NNNN.pt atomically, then prune all but the newest `keep` (0 keeps all)."""
    path = save_checkpoint(state, Path(ckpt_dir) / f"epoch-{state['epoch']:04d}.pt")
    existing = epoch_checkpoints(ckpt_dir)
    if keep:
        for old in existing[:-keep]:
            old.unlink()
    return path


def save_best(state: dict, ckpt_dir: Path) -> Path:
    """Write best.pt (model weights and where they came from) atomically."""
    return save_checkpoint(state, Path(ckpt_dir) / "best.pt")


def load_checkpoint(path: Path, required: tuple[str, ...] = REQUIRED_KEYS) -> dict:
    """Load a checkpoint safely (weights_only) and check it is one of ours.

    Raises CheckpointError naming the file, what is wrong, and which other
    checkpoint of the run (if any) is still intact.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch raises many types for torn or foreign files)
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a vggbench checkpoint "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).{_alternatives(path)}"
        ) from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: not a vggbench training checkpoint."
                              f"{_alternatives(path)}")
    if state["format"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {state['format']}, this vggbench reads "
                              f"format {FORMAT_VERSION}")
    return state


def _alternatives(bad: Path) -> str:
    """A hint naming the run's other epoch checkpoints, newest first."""
    others = [p for p in reversed(epoch_checkpoints(bad.parent)) if p != bad]
    if not others:
        return ""
    return (f" The run's other checkpoints are kept untouched: {', '.join(map(str, others))}; "
            f"continue from one with --resume {others[0]}")


def newest_checkpoint(ckpt_dir: Path) -> Path:
    """The newest epoch checkpoint of a run, or CheckpointError if it has none."""
    found = epoch_checkpoints(ckpt_dir)
    if not found:
        raise CheckpointError(f"no checkpoint to resume from in {ckpt_dir} "
                              "(a run writes one at the end of every epoch)")
    return found[-1]
