"""A failed job's cause, read from the stderr logs submitit's local executor really writes (no SLURM needed)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import cloudpickle
import submitit

from vggbench.joblogs import failed_task, failure_cause, task_logs


def fail_like_a_rank() -> None:
    """In a 2-task job, task 0 fails as vggbench's CLIs do (an error: line, exit 2); other tasks raise,
    as a rank losing its peer does."""
    job = submitit.JobEnvironment()
    if job.num_tasks > 1 and job.global_rank == 0:
        print("python -m vggbench.train: error: rank 0: the cause a user must see", file=sys.stderr, flush=True)
        sys.exit(2)
    raise RuntimeError("Connection closed by peer: rank 0 went away")


# The job's function travels by value: the job's process cannot import this test module by name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def submit_local(folder: Path, tasks: int) -> submitit.Job:
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(tasks_per_node=tasks, timeout_min=5)
    job = executor.submit(fail_like_a_rank)
    job.wait()  # until every task has ended
    return job


def test_an_exception_is_shown_as_its_last_frame_and_message(tmp_path):
    job = submit_local(tmp_path, tasks=1)
    log = task_logs(tmp_path, job.job_id)[0]
    cause = failure_cause(log.read_text())
    assert cause.kind == "exception"
    assert re.fullmatch(r'File ".+", line \d+, in fail_like_a_rank', cause.lines[0])  # the frame that raised
    assert cause.lines[1:] == ("RuntimeError: Connection closed by peer: rank 0 went away",)


def test_the_error_line_explains_the_job_before_another_rank_s_exception(tmp_path):
    job = submit_local(tmp_path, tasks=2)
    assert set(task_logs(tmp_path, job.job_id)) == {0, 1}
    failure = failed_task(tmp_path, job.job_id)
    assert failure.task == 0 and failure.log == tmp_path / f"{job.job_id}_0_log.err"
    assert failure.cause.lines == ("python -m vggbench.train: error: rank 0: the cause a user must see",)


def test_logs_of_notices_only_have_no_cause():
    notices = ("submitit INFO (2026-01-01 00:00:00,000) - Starting with JobEnvironment(...)\n\n"
               "srun: error: node1: task 0: Killed\nslurmstepd: error: *** STEP 7.0 CANCELLED ***\n")
    assert failure_cause(notices) is None
