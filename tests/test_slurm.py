"""SLURM on a real single-node cluster: `sbatch slurm/vgg38.sh`, `vggbench.launch --slurm` (submitit),
job arrays from sweep files, requeues that resume without losing an epoch, and clear refusals.

The session fixture starts the cluster with scripts/slurm_cluster.sh (installing the Debian
packages when they are missing; needs root) and stops its daemons by their PID files. If it
cannot start, the tests fail with the daemons' logs: nothing here is skipped.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vggbench.report import build_report

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
SBATCH_SCRIPT = REPO / "slurm" / "vgg38.sh"
# One CPU task per rank, nothing else asked of the 2-CPU test node.
CPU_PROFILE = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=5"]
JOB_TIMEOUT_S = 240


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Start a private SLURM cluster; yield the environment its clients need; stop it afterwards."""
    directory = tmp_path_factory.mktemp("slurm-cluster")
    start = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", str(directory)], capture_output=True,
                           text=True, timeout=900, check=False)
    if start.returncode != 0:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(directory)], capture_output=True, check=False)
        pytest.fail(f"the SLURM test cluster did not start (rc {start.returncode}):\n{start.stdout}{start.stderr}")
    env = {**os.environ, "SLURM_CONF": f"{directory}/etc/slurm.conf", "OMP_NUM_THREADS": "1",
           "VGGBENCH_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    try:
        assert start.stdout.strip() == f"export SLURM_CONF={env['SLURM_CONF']}"
        yield env
    finally:
        stop = subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(directory)], capture_output=True,
                              text=True, timeout=120, check=False)
        assert stop.returncode == 0, stop.stderr
        assert not list((directory / "run").glob("*.pid")), "a daemon's PID file is left: it was not stopped"


def tiny_train_args(cifar_dir: Path, **options: object) -> list[str]:
    """A VGG08 with 8 filters on the 600-image fake CIFAR-100 (500 train, 100 val): seconds per epoch.

    `options` (name=value; None leaves an option out) change the defaults.
    """
    values = {"model": "vgg08", "variant": "bn_rc", "filters": 8, "epochs": 2, "batch_size": 50,
              "data_dir": cifar_dir, "val_size": 100, "workers": 0, "seed": 3, **options}
    argv = ["--no-verify-checksums"]
    for name, value in values.items():
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def run(command: list[str], env: dict[str, str], timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def sbatch(env: dict[str, str], *args: str) -> str:
    result = run(["sbatch", "--parsable", *args], env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_states(env: dict[str, str], job_id: str) -> list[str]:
    """Every state sacct recorded for the job's allocation, oldest first (a requeue adds one)."""
    result = run(["sacct", "--jobs", job_id, "--allocations", "--duplicates", "--noheader", "--parsable2",
                  "--format=State"], env, timeout=30)
    return [state.split()[0] for state in result.stdout.split()]


def wait_for_job(env: dict[str, str], job_id: str, timeout: float = JOB_TIMEOUT_S) -> list[str]:
    """Wait until the job has left the queue and sacct has its final state; return job_states."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = run(["squeue", "--noheader", "--jobs", job_id], env, timeout=30).stdout.strip()
        states = job_states(env, job_id)
        if not queued and states and states[-1] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
            return states
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not end within {timeout} s (states so far: {job_states(env, job_id)})")


def wait_for_file(path: Path, process: subprocess.Popen | None = None, timeout: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        assert process is None or process.poll() is None, f"the launcher ended before {path} appeared"
        time.sleep(0.1)


def newest_epoch(run_dir: Path) -> int:
    return max(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("epoch-*.pt"))


def epochs_recorded(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sbatch_script_trains_two_cpu_ranks_to_completion(slurm_env, cifar_dir, tmp_path):
    run_dir = tmp_path / "run"
    # settings from the script's variables and defaults (variant bn_rc), the rest forwarded to train
    env = {**slurm_env, "VGGBENCH_OUT": str(run_dir), "VGGBENCH_DATA": str(cifar_dir), "VGGBENCH_MODEL": "vgg08",
           "VGGBENCH_EPOCHS": "2"}
    args = tiny_train_args(cifar_dir, model=None, variant=None, epochs=None, data_dir=None)
    job = sbatch(env, *CPU_PROFILE, f"--output={tmp_path}/job-%j.out", str(SBATCH_SCRIPT), *args)
    assert wait_for_job(env, job) == ["COMPLETED"]
    log = (tmp_path / f"job-{job}.out").read_text()
    assert "1 node(s) x 2 task(s), 0 GPU(s) per node, device cpu" in log
    assert job_name(env, job) == "vggbench-vgg08-bn_rc-lr0.001-seed3"  # renamed after what it trains
    assert epochs_recorded(run_dir) == [1, 2]
    assert (run_dir / "checkpoints" / "epoch-0002.pt").is_file() and (run_dir / "checkpoints" / "best.pt").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["world_size"], config["model"], config["variant"], config["device"]) == (2, "vgg08", "bn_rc", "cpu")
    assert "test_acc" in json.loads((run_dir / "test.json").read_text())


@pytest.mark.parametrize("stop", [
    ["scontrol", "requeue"],  # an operator's requeue (preemption with PreemptMode=REQUEUE is alike)
    ["scancel", "--batch", "--signal=USR1"],  # what SLURM sends the script before the time limit
], ids=["scontrol-requeue", "time-limit-signal"])
def test_sbatch_script_resumes_after_a_requeue(slurm_env, cifar_dir, tmp_path, stop):
    run_dir = tmp_path / "run"
    env = {**slurm_env, "VGGBENCH_OUT": str(run_dir)}
    args = tiny_train_args(cifar_dir, epochs=4, batch_size=10)  # ~2 s per epoch: time to requeue mid-run
    job = sbatch(env, *CPU_PROFILE, f"--output={tmp_path}/job-%j.out", str(SBATCH_SCRIPT), *args, "--deterministic")
    wait_for_file(run_dir / "checkpoints" / "epoch-0001.pt")
    requeue = run([*stop, job], env, timeout=30)
    checkpointed = newest_epoch(run_dir)  # completed epochs when the job was stopped (or later)
    assert requeue.returncode == 0, requeue.stderr
    assert checkpointed < 4, "the run finished before it could be requeued: make its epochs longer"
    assert wait_for_job(env, job) == ["REQUEUED", "COMPLETED"]
    log = (tmp_path / f"job-{job}.out").read_text()
    assert "DUE TO JOB REQUEUE" in log and "(start 2 of this job)" in log
    assert ("time limit near: requeueing" in log) == (stop[0] == "scancel")
    resumed = int(re.search(r"resuming \S+ after epoch (\d+)", log).group(1))
    assert checkpointed <= resumed < 4  # no completed epoch is lost
    assert epochs_recorded(run_dir) == [1, 2, 3, 4]  # and none is trained twice into the history
    assert (run_dir / "test.json").is_file()


def test_submitit_two_tasks_checkpoint_requeue_and_resume(slurm_env, cifar_dir, tmp_path):
    """`launch --slurm` with 2 tasks; the pre-timeout signal (sent early) makes submitit requeue the job."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "vggbench.launch", "--slurm", "--ntasks-per-node", "2", "--time", "5", "--wait",
               *tiny_train_args(cifar_dir, epochs=4, batch_size=10), "--out-dir", str(run_dir)]
    launcher = subprocess.Popen(command, cwd=REPO, env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        submitted = launcher.stdout.readline()
        job = re.fullmatch(r"submitted job (\d+) to SLURM \(1 node\(s\) x 2 task\(s\), no GPU\(s\) per node\); "
                           r"logs in (\S+)\n", submitted)
        if not job:
            launcher.kill()
            pytest.fail(f"unexpected launcher output {submitted!r}; stderr:\n{launcher.communicate()[1]}")
        assert job.group(2) == str(run_dir / ".submitit")
        wait_for_file(run_dir / "checkpoints" / "epoch-0001.pt", launcher)
        signal = run(["scancel", "--signal=USR2", job.group(1)], slurm_env, timeout=30)
        assert signal.returncode == 0, signal.stderr
        out, err = launcher.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, out + err
    assert f"job {job.group(1)} finished: {run_dir} (test accuracy" in out
    assert wait_for_job(slurm_env, job.group(1)) == ["REQUEUED", "COMPLETED"]
    rank0_log = (run_dir / ".submitit" / f"{job.group(1)}_0_log.out").read_text()
    assert "Calling checkpoint method" in rank0_log and "Requeued job" in rank0_log
    assert re.search(r"resuming \S+ after epoch [123]\n", rank0_log)
    assert epochs_recorded(run_dir) == [1, 2, 3, 4]
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 2


def test_sweep_job_array_with_concurrency_cap_then_report(slurm_env, cifar_dir, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"out_dir: {tmp_path / 'study'}\nbase: {{epochs: 1}}\ngrid:\n  seed: [1, 2, 3]\n")
    args = tiny_train_args(cifar_dir, seed=None, epochs=None)
    result = run([sys.executable, "-m", "vggbench.launch", "--slurm", "--sweep", str(sweep), "--array-parallelism",
                  "2", "--time", "5", "--wait", *args], slurm_env)
    assert result.returncode == 0, result.stdout + result.stderr
    array = re.search(r"as job array (\d+), at most 2 at once", result.stdout).group(1)
    run_dirs = [tmp_path / "study" / f"vgg08-bn_rc-lr0.001-seed{seed}" for seed in (1, 2, 3)]
    for index, run_dir in enumerate(run_dirs):
        assert f"  {array}_{index}  {run_dir}\n" in result.stdout
        assert f"job {array}_{index} finished: {run_dir}" in result.stdout
    submission = (tmp_path / "study" / ".submitit" / f"{array}_submission.sh").read_text()
    assert "#SBATCH --array=0-2%2" in submission and "#SBATCH --job-name=vggbench-sweep-sweep" in submission
    for task in range(3):
        assert wait_for_job(slurm_env, f"{array}_{task}") == ["COMPLETED"]
    times = run(["sacct", "--jobs", array, "--allocations", "--noheader", "--parsable2", "--format=Start,End"],
                slurm_env, timeout=30).stdout.split()
    starts, ends = zip(*(line.split("|") for line in times))
    assert len(starts) == 3 and not max(starts) < min(ends), f"3 array jobs ran at once: {times}"
    report = build_report(run_dirs)
    [row] = report.rows  # the seeds of one configuration form one row
    assert row["seeds"] == 3 and row["label"] == "VGG08 BN+RC"
    assert row["test_acc"]["std"] is not None and " ± " in report.markdown


def test_a_failing_job_s_state_and_cause_reach_the_launcher(slurm_env, tmp_path):
    """A rank fails inside the job (no data on the node: exit 2); `--wait` shows why, not only the .err file."""
    job = assert_failure_reported(slurm_env, tmp_path, [], "SLURM", "FAILED")
    assert job_states(slurm_env, job) == ["FAILED"]
    assert job_name(slurm_env, job) == "vggbench-vgg08-plain-lr0.01-seed3"  # what the command line trains


def assert_failure_reported(env: dict[str, str], tmp_path: Path, executor: list[str], where: str, state: str) -> str:
    """Run a 2-rank `launch --slurm --wait` whose --data-dir is empty; check its report; return the job id."""
    run_dir, missing = tmp_path / "run", tmp_path / "no-data"
    args = tiny_train_args(missing, variant="plain", lr=0.01)
    result = run([sys.executable, "-m", "vggbench.launch", "--slurm", *executor, "--ntasks-per-node", "2",
                  "--time", "5", "--wait", *args, "--out-dir", str(run_dir)], env)
    assert result.returncode == 1, result.stdout + result.stderr
    job = re.search(rf"submitted job (\d+) to {where} ", result.stdout).group(1)
    lines = result.stderr.splitlines()
    report = lines[lines.index(f"job {job} failed (state {state}): {run_dir}"):]
    assert report[1] == "  rank 0:"
    assert report[2].startswith(f"    python -m vggbench.train: error: rank 0: CIFAR-100 not found: expected the "
                                f"files train, test, meta in {missing / 'cifar-100-python'}")
    assert report[3:] == [f"  full log: {run_dir / '.submitit' / f'{job}_0_log.err'}", "1 of 1 job(s) failed"]
    return job


def job_name(env: dict[str, str], job_id: str) -> str:
    """The job's name as sacct recorded it."""
    result = run(["sacct", "--jobs", job_id, "--allocations", "--noheader", "--parsable2", "--format=JobName"], env,
                 timeout=30)
    return result.stdout.strip()


def test_gpu_request_on_a_cluster_without_gpus_is_refused_clearly(slurm_env, cifar_dir, tmp_path):
    script = run(["sbatch", str(SBATCH_SCRIPT)], slurm_env)  # its defaults ask for 4 GPUs per node
    assert script.returncode != 0 and "Invalid generic resource (gres) specification" in script.stderr
    launch = run([sys.executable, "-m", "vggbench.launch", "--slurm", "--gpus-per-node", "1",
                  *tiny_train_args(cifar_dir), "--out-dir", str(tmp_path / "run")], slurm_env)
    assert launch.returncode == 2
    assert ("python -m vggbench.launch: error: sbatch refused the job: Invalid generic resource (gres) "
            "specification\nhint: no node here has such GPUs") in launch.stderr
    assert "--gpus-per-node 0 --ntasks-per-node N" in launch.stderr


def test_local_executor_runs_the_same_path_without_slurm(cifar_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": str(tmp_path)}  # no SLURM commands, nothing on PATH
    run_dir = tmp_path / "run"
    result = run([sys.executable, "-m", "vggbench.launch", "--slurm", "--executor", "local", "--time", "5", "--wait",
                  *tiny_train_args(cifar_dir, epochs=1), "--out-dir", str(run_dir)], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "to local processes (1 node(s) x 1 task(s)" in result.stdout
    assert epochs_recorded(run_dir) == [1] and (run_dir / "test.json").is_file()


def test_local_executor_wait_prints_the_failing_rank_s_cause_and_log(tmp_path):
    """The local executor's path through `launch --slurm --wait`: a rank fails inside the job (no data there)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert_failure_reported(env, tmp_path, ["--executor", "local"], "local processes", "FINISHED")


def test_local_executor_refuses_a_master_port_its_ranks_cannot_use(cifar_dir, tmp_path):
    """Refused at submission, not after rank 0 fails and the others wait --dist-timeout for it."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"out_dir: {tmp_path / 'study'}\ngrid:\n  seed: [1, 2]\n")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (str(port), [], f"MASTER_PORT={port} is in use on this machine"),
            ("70000", [], "MASTER_PORT='70000' is not a port (1..65535): unset it"),
            ("²", [], "MASTER_PORT='²' is not a port"),  # a digit to str.isdigit, not to int()
            (str(port + 1), ["--sweep", str(sweep)], f"MASTER_PORT={port + 1} would be shared by the 2 runs"),
        ]
        for master_port, sweep_args, message in cases:
            env = {**os.environ, "MASTER_PORT": master_port}
            result = run([sys.executable, "-m", "vggbench.launch", "--slurm", "--executor", "local",
                          "--ntasks-per-node", "2", *sweep_args, *tiny_train_args(cifar_dir, seed=None),
                          "--out-dir", str(tmp_path / "run")], env, timeout=120)
            assert result.returncode == 2, result.stdout + result.stderr
            assert f"python -m vggbench.launch: error: {message}" in result.stderr
            assert not (tmp_path / "run").exists() and not (tmp_path / "study").exists()


def test_missing_sbatch_is_explained(cifar_dir, tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}
    result = run([sys.executable, "-m", "vggbench.launch", "--slurm", *tiny_train_args(cifar_dir)], env)
    assert result.returncode == 2
    assert "sbatch is not on PATH" in result.stderr and "--executor local" in result.stderr
