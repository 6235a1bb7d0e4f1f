"""Submit trainings to SLURM through submitit: `python -m vggbench.launch --slurm [options] [train options]`.

One job runs one training with one task per GPU (`--gpus-per-node N`; `--nodes M` for
M x N ranks) or, without GPUs, `--ntasks-per-node N` CPU tasks (gloo). Every task runs
`vggbench.train.main` in-process, its rank, world size and rendezvous exported by
submitit's TorchDistributedEnvironment (vggbench.distributed reads them), with rank 0's port
chosen here: MASTER_PORT when the submitting shell sets it, else a free one for local
processes and `slurm_master_port(job id)` on SLURM. submitit's logs go to `<run dir>/.submitit/`.

Requeue: the job is requeueable. Before the time limit submitit signals the job, which
requeues itself (TrainingJob is a submitit Checkpointable); after any restart (that
requeue, a preemption, `scontrol requeue`, a node failure) the run directory holds the
epoch checkpoints train writes atomically every epoch, and TrainingJob continues from the
newest one with `--resume` (vggbench.resume): no completed epoch is lost.

`--sweep FILE` submits the grid of a sweep file (vggbench.sweep) as one job array, at most
`--array-parallelism` jobs running at once, one run directory per grid point; the report
tool then tabulates them: `python -m vggbench.report <out_dir>/*/`.

`--executor local` runs the same jobs through submitit's LocalExecutor, without SLURM.
`--wait` blocks until every job has ended, reports each (a failed one with its state, the cause
from the failing rank's stderr log and that log's path), and exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit
import torch
from submitit.core.utils import FailedJobError, UncompletedJobError

from vggbench.config import ConfigError, TrainConfig, explicit_options
from vggbench.distributed import free_ports, port_in_use, slurm_master_port
from vggbench.graphs import check_capturable
from vggbench.joblogs import failed_task
from vggbench.jobname import job_name
from vggbench.resume import resumable_argv
from vggbench.sweep import SweepError, SweepRun, load_sweep
from vggbench.train import build_parser
from vggbench.train import main as train_main

LOG_DIR = ".submitit"  # inside the run directory (or a sweep's output directory); hidden from `<dir>/*`
SIGNAL_DELAY_MAX_S = 90  # submitit's default warning before the time limit, for limits of 6+ minutes
FINAL_STATE_WAIT_S = 30  # how long a failed job's report waits for sacct to record the job's end
UNFINISHED_STATES = ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "UNKNOWN")
# sbatch messages and what to do about them (SLURM's own words come first).
SBATCH_HINTS = (
    ("Invalid generic resource",
     "no node here has such GPUs (`sinfo -o '%P %N %G'`); on CPUs use --gpus-per-node 0 --ntasks-per-node N"),
    ("More processors requested than permitted",
     "ask for fewer tasks or CPUs per node: `sinfo -o '%P %N %c'` shows the CPUs of each node"),
    ("Requested node configuration is not available",
     "no node has that many CPUs/GPUs/memory: compare with `sinfo -o '%P %N %c %m %G'`"),
    ("invalid partition", "list the partitions with `sinfo -s`"),
    ("Invalid account", "list your accounts with `sacctmgr show associations user=$USER format=account`"),
)


class SubmitError(Exception):
    """A submission that cannot be made; the message says what to change."""


class TrainingJob(submitit.helpers.Checkpointable):
    """One training as a submitit job: every task runs vggbench.train on `train_argv`.

    When the run directory already holds epoch checkpoints (a requeued or restarted job,
    or a resubmission), `--resume` is added (vggbench.resume), so the run continues from
    its newest checkpoint. submitit's `checkpoint()` (inherited) resubmits this same job
    on a time-out or preemption signal; that rule makes the new attempt continue.
    """

    def __init__(self, train_argv: Sequence[str], run_dir: str | Path, master_port: int | None = None) -> None:
        self.train_argv = list(train_argv)
        self.run_dir = Path(run_dir)
        self.master_port = master_port  # rank 0's port, when the submitter chose it (local processes)

    def __call__(self) -> dict[str, Any]:
        """Train (every task; rank 0 writes the run directory); return this task's rank and the test result."""
        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            # submitit would pick a random port in 20000..60000, where outgoing connections may
            # hold it: then rank 0 fails and the others wait for it until --dist-timeout
            if self.master_port is not None:
                os.environ["MASTER_PORT"] = str(self.master_port)
            elif not os.environ.get("MASTER_PORT"):  # one given in the submitting shell is kept
                os.environ["MASTER_PORT"] = str(slurm_master_port(int(os.environ["SLURM_JOB_ID"])))
            # RANK/WORLD_SIZE/MASTER_ADDR: for submitit's local executor (srun's tasks would also find
            # their rank in SLURM's variables), replacing any inherited from the submitting shell;
            # the scheduler decides which GPUs a task sees.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        # train exits (SystemExit, no result: submitit reports the job's stderr) when it fails
        train_main(resumable_argv(self.train_argv))
        test_file = self.run_dir / "test.json"
        test = json.loads(test_file.read_text()) if job.global_rank == 0 and test_file.is_file() else None
        return {"rank": job.global_rank, "run_dir": str(self.run_dir), "test": test}


def submit(args: argparse.Namespace, train_argv: list[str]) -> int:
    """Submit the training (or, with --sweep, its grid as a job array); return an exit status.

    `args` holds vggbench.launch's SLURM options, `train_argv` the vggbench.train options
    (already checked). Returns 0 once the jobs are queued (with --wait: once all have
    succeeded, else 1), or 2 with a message on stderr when the options, the sweep file or
    the cluster do not allow the submission (sbatch's refusals are quoted, with a hint).
    """
    try:
        return _submit(args, train_argv)
    except SubmitError as err:
        print(f"python -m vggbench.launch: error: {err}", file=sys.stderr)
        return 2


def _submit(args: argparse.Namespace, train_argv: list[str]) -> int:
    _check_args(args)
    cfg = TrainConfig(**vars(build_parser().parse_args(train_argv)))
    tasks_per_node, device = _tasks_and_device(args, cfg, train_argv)
    train_argv = [*train_argv, "--device", device] if "device" not in explicit_options(train_argv) else train_argv
    runs = _runs(args, cfg, train_argv)
    _check_capturable(runs, device, args.nodes * tasks_per_node)
    log_dir = (runs[0].run_dir.parent if args.sweep else runs[0].run_dir) / LOG_DIR
    name = f"vggbench-sweep-{Path(args.sweep).stem}" if args.sweep else job_name(cfg)
    ports = _local_ports(len(runs)) if args.executor == "local" and tasks_per_node > 1 else [None] * len(runs)
    executor = _executor(args, log_dir, tasks_per_node, name)
    jobs = _submit_all(executor, runs, ports, bool(args.sweep))
    where = "SLURM" if args.executor == "slurm" else "local processes"
    shape = f"{args.nodes} node(s) x {tasks_per_node} task(s), {args.gpus_per_node or 'no'} GPU(s) per node"
    if args.sweep:
        if args.executor == "slurm":
            cap = f", at most {args.array_parallelism} at once" if args.array_parallelism else ""
            how = f"as job array {jobs[0].job_id.split('_')[0]}{cap}"
        else:
            how = "all at once"  # the local executor has no arrays and no cap
        print(f"submitted {len(jobs)} runs of {args.sweep} to {where} {how} ({shape} each); logs in {log_dir}")
    else:
        print(f"submitted job {jobs[0].job_id} to {where} ({shape}); logs in {log_dir}")
    for job, run in zip(jobs, runs):
        print(f"  {job.job_id}  {run.run_dir}")
    root = runs[0].run_dir.parent
    if args.sweep:
        print(f"when they have finished: python -m vggbench.report {root}/*/ --out {root}/report.md")
    sys.stdout.flush()
    return _wait(jobs, runs) if args.wait else 0


def _check_args(args: argparse.Namespace) -> None:
    """Counts in range, and options that only mean something together."""
    for name, minimum in (("nodes", 1), ("time", 1), ("gpus_per_node", 0), ("ntasks_per_node", 1),
                          ("cpus_per_task", 1), ("array_parallelism", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise SubmitError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    if args.array_parallelism is not None and not args.sweep:
        raise SubmitError("--array-parallelism caps the jobs of a job array: use it with --sweep FILE")
    if args.executor == "local" and args.nodes > 1:
        raise SubmitError("--executor local runs on this machine only: use --nodes 1")


def _tasks_and_device(args: argparse.Namespace, cfg: TrainConfig, train_argv: list[str]) -> tuple[int, str]:
    """Tasks per node (one per GPU, else --ntasks-per-node) and the device the tasks train on."""
    device = cfg.device
    given = "device" in explicit_options(train_argv)
    if args.gpus_per_node:
        if args.ntasks_per_node not in (None, args.gpus_per_node):
            raise SubmitError(f"one task per GPU: --ntasks-per-node ({args.ntasks_per_node}) must equal "
                              f"--gpus-per-node ({args.gpus_per_node}), or be left out")
        if given and device not in ("cuda", "auto"):
            raise SubmitError(f"--gpus-per-node {args.gpus_per_node} trains on GPUs, but --device is {device}: "
                              "leave --device out, or use --gpus-per-node 0 --ntasks-per-node N for CPU tasks")
        return args.gpus_per_node, "cuda"
    if given and device not in ("cpu", "auto"):
        raise SubmitError(f"--device {device} needs GPUs: request them with --gpus-per-node N")
    return args.ntasks_per_node or 1, "cpu"


def _check_capturable(runs: list[SweepRun], device: str, world_size: int) -> None:
    """Refuse now, not in the job, runs whose --cuda-graphs these tasks cannot capture."""
    for run in runs:
        try:
            check_capturable(TrainConfig(**vars(build_parser().parse_args(run.train_argv))), torch.device(device),
                             world_size)
        except ConfigError as err:
            raise SubmitError(str(err)) from None


def _runs(args: argparse.Namespace, cfg: TrainConfig, train_argv: list[str]) -> list[SweepRun]:
    """The runs to submit, with absolute run directories (jobs may start in another directory)."""
    if args.sweep:
        try:
            runs = load_sweep(args.sweep, train_argv)
        except SweepError as err:
            raise SubmitError(str(err)) from None
    else:
        runs = [SweepRun(cfg.run_dir, train_argv)]
    return [SweepRun(run.run_dir.absolute(), [*run.train_argv, "--out-dir", str(run.run_dir.absolute())])
            for run in runs]


def _executor(args: argparse.Namespace, log_dir: Path, tasks_per_node: int, name: str) -> submitit.AutoExecutor:
    """A submitit executor for SLURM or local processes, with the job's resources."""
    if args.executor == "slurm":
        _check_slurm_clients()
    params: dict[str, Any] = {
        "name": name,
        "nodes": args.nodes,
        "tasks_per_node": tasks_per_node,
        "timeout_min": args.time,
        # submitit warns the job this long before the time limit (it then requeues itself)
        "slurm_signal_delay_s": min(SIGNAL_DELAY_MAX_S, args.time * 15),
        "slurm_additional_parameters": {"requeue": True},
        # Each task sees SLURM_CPUS_PER_TASK threads; without OMP_NUM_THREADS torch would use every core.
        "slurm_setup": ['export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"'],
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task is not None:
        params["cpus_per_task"] = args.cpus_per_task
        # srun does not inherit --cpus-per-task from the batch allocation (SLURM >= 22.05)
        params["slurm_srun_args"] = [f"--cpus-per-task={args.cpus_per_task}"]
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.account:
        params["slurm_account"] = args.account
    if args.array_parallelism is not None:
        params["slurm_array_parallelism"] = args.array_parallelism
    executor = submitit.AutoExecutor(folder=log_dir, cluster=args.executor)
    executor.update_parameters(**params)
    return executor


def _check_slurm_clients() -> None:
    """sbatch on PATH, and a cluster configuration for it to read."""
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch is not on PATH: --slurm needs SLURM's client commands (on a cluster's login "
                          "node). Without SLURM use --executor local, or --nproc N / --gpus N")
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        raise SubmitError(f"SLURM_CONF={conf} does not exist: point it at the cluster's slurm.conf (for the "
                          "local test cluster: eval \"$(scripts/slurm_cluster.sh start)\")")


def _local_ports(count: int) -> list[int]:
    """Rank 0's port for each of `count` runs in local processes, which run at once: free ones, or MASTER_PORT."""
    given = os.environ.get("MASTER_PORT")
    if not given:
        return free_ports(count)
    if not (given.isascii() and given.isdigit()) or not 1 <= int(given) <= 65535:
        raise SubmitError(f"MASTER_PORT={given!r} is not a port (1..65535): unset it, and a free one is chosen")
    if count > 1:
        raise SubmitError(f"MASTER_PORT={given} would be shared by the {count} runs of the sweep, which run at "
                          "once: unset it, and each run gets a free port")
    if port_in_use(int(given)):
        raise SubmitError(f"MASTER_PORT={given} is in use on this machine, so rank 0 could not listen on it: "
                          "unset MASTER_PORT (a free port is then chosen) or give a free one")
    return [int(given)]


def _submit_all(executor: submitit.AutoExecutor, runs: list[SweepRun], ports: list[int | None],
                array: bool) -> list[submitit.Job]:
    """Submit one job per run (one job array for a sweep); sbatch refusals become SubmitErrors."""
    try:
        if not array:
            return [executor.submit(TrainingJob(runs[0].train_argv, runs[0].run_dir, ports[0]))]
        with executor.batch():
            jobs = [executor.submit(TrainingJob(run.train_argv, run.run_dir, port)) for run, port in zip(runs, ports)]
        return jobs
    except FailedJobError as err:
        raise SubmitError(_explain_refusal(str(err))) from None


def _explain_refusal(message: str) -> str:
    """sbatch's message plus what to do about it."""
    text = " ".join(line.removeprefix("sbatch: error: ").strip() for line in message.strip().splitlines())
    hints = [hint for needle, hint in SBATCH_HINTS if needle.lower() in text.lower()]
    if "configuration" in text.lower() and ("SLURM_CONF" not in os.environ or "DNS SRV" in text):
        hints.append("sbatch found no cluster configuration: set SLURM_CONF to the cluster's slurm.conf (for the "
                     "local test cluster: eval \"$(scripts/slurm_cluster.sh start)\")")
    return f"sbatch refused the job: {text}" + (f"\nhint: {' '.join(hints)}" if hints else "")


def _wait(jobs: list[submitit.Job], runs: list[SweepRun]) -> int:
    """Block until every job has ended; print each outcome; 0 if all succeeded, else 1 (130 on Ctrl-C).

    A failed job is reported with its final state, the cause from the failing task's stderr
    (vggbench.joblogs) and the path of that log.
    """
    failed = 0
    for job, run in zip(jobs, runs):
        try:
            results = job.results()
        except KeyboardInterrupt:
            print("\ninterrupted: stopped waiting; the jobs go on (squeue, sacct, or scancel them)", file=sys.stderr)
            return 130
        except (FailedJobError, UncompletedJobError):
            failed += 1
            print(_failure_report(job, run), file=sys.stderr)
            continue
        test = next((r["test"] for r in results if r["test"]), None)
        outcome = f"test accuracy {test['test_acc']:.2f}%" if test else "no test result"
        print(f"job {job.job_id} finished: {run.run_dir} ({outcome})")
    if failed:
        print(f"{failed} of {len(jobs)} job(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _failure_report(job: submitit.Job, run: SweepRun) -> str:
    """"job ID failed (state ...): run dir", the cause from the failing task's log, and that log's path."""
    head = f"job {job.job_id} failed (state {_final_state(job)}): {run.run_dir}"
    failure = failed_task(job.paths.folder, job.job_id)
    if failure is None:
        return f"{head}\n  its tasks wrote no error; logs in {job.paths.folder}"
    cause = "\n".join(f"    {line}" for line in failure.cause.lines)
    return f"{head}\n  rank {failure.task}:\n{cause}\n  full log: {failure.log}"


def _final_state(job: submitit.Job) -> str:
    """The job's state once the scheduler has recorded its end (sacct lags a little), or the last one seen."""
    deadline = time.monotonic() + FINAL_STATE_WAIT_S
    while True:
        job.get_info(mode="force")  # submitit's cached state may date from before the job ended
        if job.state not in UNFINISHED_STATES or time.monotonic() > deadline:
            return job.state
        time.sleep(1)
