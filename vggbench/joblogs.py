"""Why a submitit job failed, from its tasks' stderr logs: the lines a user needs, and where the rest is.

A failed task's ``<job>_<task>_log.err`` holds submitit's and srun's notices around the
cause: a one-line ``error:`` from vggbench (bad data, options or checkpoints) or a Python
traceback. `failure_cause` picks the cause out of one log; `failed_task` picks the task
whose log explains the failure (an ``error:`` line before an exception, since ranks that
lose a failed peer raise exceptions of their own; then the lowest rank).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FALLBACK_LINES = 5  # lines shown when a log holds neither an error line nor a traceback

# Lines that are never the cause: submitit's logging, srun's and slurmstepd's notices, blanks.
_NOISE = re.compile(r"submitit (DEBUG|INFO|WARNING|ERROR|CRITICAL) \(|srun: |slurmstepd: |\s*$")
_RANK_PREFIX = re.compile(r"^\[rank\d+\]: ")  # torch.distributed prefixes each line of a rank's traceback
_ERROR_LINE = re.compile(r"^\S.*\berror: ")  # argparse style, as vggbench's CLIs write: "prog: error: ..."
_TRACEBACK = "Traceback (most recent call last):"


@dataclass(frozen=True)
class Cause:
    """What a task's log says about its failure: `kind` "error" (an error: line), "exception" or "output"."""

    kind: str
    lines: tuple[str, ...]


@dataclass(frozen=True)
class TaskFailure:
    """The task whose log explains a failed job, its cause, and the log's path."""

    task: int
    cause: Cause
    log: Path


def failure_cause(text: str) -> Cause | None:
    """The cause of a failure in a task's stderr `text`, or None when it holds nothing but notices.

    The last ``error:`` line or the last exception wins, whichever comes later; an exception
    is shown as the last frame's location and the exception line(s).
    """
    lines = [_RANK_PREFIX.sub("", line.rstrip()) for line in text.splitlines()]
    lines = [line for line in lines if not _NOISE.match(line)]
    for end in range(len(lines) - 1, -1, -1):
        if _ERROR_LINE.match(lines[end]):
            return Cause("error", (lines[end],))
        if lines[end] == _TRACEBACK:
            return Cause("exception", _exception(lines[end + 1:]))
    return Cause("output", tuple(lines[-FALLBACK_LINES:])) if lines else None


def _exception(traceback: list[str]) -> tuple[str, ...]:
    """The last frame's "File ..." line and the exception line(s) of one traceback's lines."""
    frames = [i for i, line in enumerate(traceback) if line.startswith("  File ")]
    message = next((i for i in range(frames[-1] + 1 if frames else 0, len(traceback))
                    if not traceback[i].startswith(" ")), len(traceback))
    location = (traceback[frames[-1]].strip(),) if frames else ()
    return (*location, *traceback[message:])


def task_logs(folder: Path, job_id: str) -> dict[int, Path]:
    """The stderr logs submitit wrote for the tasks of job `job_id` in `folder`, by task (rank)."""
    pattern = re.compile(rf"{re.escape(job_id)}_(\d+)_log\.err")
    matches = ((pattern.fullmatch(path.name), path) for path in folder.glob(f"{job_id}_*_log.err"))
    return {int(match.group(1)): path for match, path in matches if match}


def failed_task(folder: Path, job_id: str) -> TaskFailure | None:
    """The task whose log best explains why job `job_id` failed, or None when no log says anything."""
    failures = []
    for task, log in sorted(task_logs(folder, job_id).items()):
        cause = failure_cause(log.read_text(errors="replace"))
        if cause is not None:
            failures.append(TaskFailure(task, cause, log))
    order = ("error", "exception", "output")
    return min(failures, key=lambda failure: order.index(failure.cause.kind), default=None)
