"""Checkpoint files: atomic writes, safe loads, signals held during writes.

Every file is written to a temporary name, flushed to disk and renamed over the
target, so a crash leaves either the old or the new file, never a torn one. Loading
uses torch.load(weights_only=True): checkpoints hold only tensors and plain data.
What a run directory holds, and in which order it is written, is vggbench.run_dir's job.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

# 2: epoch checkpoints also hold the best epoch's weights ("best_model"), from which best.pt is repaired
FORMAT_VERSION = 2
REQUIRED_KEYS = ("format", "epoch", "config", "runtime", "model", "best_model", "optimizer", "scheduler", "history")
BEST_KEYS = ("format", "epoch", "val_acc", "model")  # best.pt
TMP_SUFFIX = ".tmp"  # temporaries are .<name>.<random>.tmp
_EPOCH_FILE = re.compile(r"epoch-(\d+)\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the run; the message says what to do."""


# Signals that end or interrupt a run: Ctrl-C, and SLURM's (or a launcher's) SIGTERM and SIGUSR1
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class WriteError(RuntimeError):
    """A file of the run could not be written (disk full, permissions); the previous version is kept."""


@contextlib.contextmanager
def interrupts_deferred():
    """Hold SIGINT, SIGTERM and SIGUSR1 until the block has finished, then deliver them.

    A write (or a sequence of writes that only make sense together) is then never abandoned
    half-way. A signal that arrived is re-raised with the disposition it had before, so it
    acts exactly as it would have (KeyboardInterrupt, termination, or the launcher's
    handler), only later. Nested blocks defer to the outermost one.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be changed from the main thread
        return
    received: list[int] = []
    # a handler installed outside Python (getsignal: None) cannot be put back, so it is left alone
    previous = {sig: handler for sig in DEFERRED_SIGNALS if (handler := signal.getsignal(sig)) is not None}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(received):  # each signal once, in order of arrival
            signal.raise_signal(sig)


def _os_cause(err: BaseException) -> OSError | None:
    """The OSError behind `err` (torch.save wraps a failed write in its own RuntimeError)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        err = err.__cause__ or err.__context__
    return None


def atomic_write(path: Path, write) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, fsync, then rename it to `path`.

    A failing write (a full disk, ...) raises WriteError naming the file and the cause, and
    leaves the previous `path` as it was.
    """
    path = Path(path)
    with interrupts_deferred():
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from other users
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # make the rename itself durable
            finally:
                os.close(dir_fd)
        except Exception as err:
            cause = _os_cause(err)
            if cause is None:
                raise
            raise WriteError(f"could not write {path}: {os.strerror(cause.errno)} "
                             f"({errno.errorcode.get(cause.errno, cause.errno)})") from None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_save_figure(fig, path: Path, **savefig_kwargs: Any) -> Path:
    """Write a matplotlib figure as PNG atomically (a killed plot leaves the previous PNG, never
    half of one) and return its path."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", **savefig_kwargs))
    return Path(path)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write a JSON file atomically (indented, for people to read)."""
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def check_writable_dir(directory: Path, option: str) -> None:
    """Create `directory` if needed and prove a file can be written in it, before any work whose
    results go there; WriteError telling the user to choose another `option` (the flag that
    named it) if not."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise WriteError(f"{option}: {directory} is a file, not a directory: choose another {option}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise WriteError(f"{option}: cannot write into {directory}: {err.strerror} (a read-only file system, "
                         f"a file in the way, or no permission): choose another {option}") from None


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
    if isinstance(state, dict) and state.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {state['format']}, this vggbench reads "
                              f"format {FORMAT_VERSION}")
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: not a vggbench training checkpoint."
                              f"{_alternatives(path)}")
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
