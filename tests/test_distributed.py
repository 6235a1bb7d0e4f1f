"""Distributed training on CPU ranks (gloo), for real: environments, the launcher, 1-vs-2-rank equivalence, failures.

Every launch starts real processes (`python -m vggbench.launch --nproc 2 --device cpu`);
nothing is mocked. The runs are tiny (VGG08 with 8 filters on 500 fake CIFAR-100 images)
because the test machine may have only 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from tests import dist_workers
from tests.helpers import metrics, option, set_option, without_timing
from vggbench import launch
from vggbench.checkpoint import load_checkpoint
from vggbench.config import ConfigError, TrainConfig
from vggbench.data import rank_shard
from vggbench.distributed import DistEnv, free_ports, parse_hostlist, port_in_use, rank_device, slurm_master_port
from vggbench.models import convert_sync_batchnorm
from vggbench.train import Trainer, build_parser, main, make_model

ROOT = Path(__file__).resolve().parents[1]
TWO_CPU_RANKS = ["--nproc", "2"]
CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def start_launch(args: list[str]) -> subprocess.Popen:
    """`python -m vggbench.launch ARGS` in the background, output captured."""
    return subprocess.Popen([sys.executable, "-m", "vggbench.launch", *args], cwd=ROOT, env=CHILD_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_launch(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vggbench.launch", *args], cwd=ROOT, env=CHILD_ENV,
                          capture_output=True, text=True, timeout=300, check=False)


def rank_pids(proc: subprocess.Popen) -> list[int]:
    """Read the launcher's stderr up to the line naming the ranks' pids."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if match := re.search(r"started rank pids ([\d ]+)", line):
            return [int(pid) for pid in match.group(1).split()]
    raise AssertionError(f"the launcher never started its ranks: {''.join(seen)}")


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"launcher exited early ({proc.returncode}): {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


# --- (a) where a process sits: torchrun, SLURM, host lists ---------------------------------------------


@pytest.mark.parametrize("hostlist, hosts", [
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("gpu5", ["gpu5"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("n[008-010]-ib", ["n008-ib", "n009-ib", "n010-ib"]),
    ("r[1-2]n[3,5]", ["r1n3", "r1n5", "r2n3", "r2n5"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
])
def test_slurm_hostlists_expand(hostlist, hosts):
    assert parse_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["", "n[1-2", "n1-2]", "n[[1]]", "n[3-1]", "n[a-b]", "n[]", "a,,b"])
def test_malformed_hostlists_are_refused(hostlist):
    with pytest.raises(ValueError, match="host list"):
        parse_hostlist(hostlist)


def test_no_launcher_means_one_process():
    env = DistEnv.from_environ({"PATH": "/bin"})
    assert env == DistEnv() and not env.distributed and env.is_main


def test_torchrun_environment():
    env = DistEnv.from_environ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1",
                                "MASTER_PORT": "29500", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"})
    assert env == DistEnv(rank=3, local_rank=1, world_size=4, master_addr="10.0.0.1", master_port=29500)
    assert env.distributed and not env.is_main
    # a one-process torchrun is a plain single process
    assert DistEnv.from_environ({"RANK": "0", "WORLD_SIZE": "1"}) == DistEnv()


def test_free_ports_are_distinct_and_free_until_taken():
    ports = free_ports(8)
    assert len(set(ports)) == 8 and not any(port_in_use(port) for port in ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", ports[0]))  # one address is enough to stop rank 0 listening on all
        listener.listen()
        assert port_in_use(ports[0]) and not port_in_use(ports[1])
    assert not port_in_use(ports[0])


def test_srun_step_environment():
    slurm = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
             "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]"}
    assert DistEnv.from_environ(slurm) == DistEnv(3, 1, 4, "gpu07", 15000 + 123456 % 17000)
    assert slurm_master_port(123456) == slurm_master_port(123456) != slurm_master_port(123457)
    # every job's port lies below Linux's ephemeral ports, which outgoing connections may hold
    assert {slurm_master_port(job) for job in range(17000)} == set(range(15000, 32000))
    # MASTER_ADDR / MASTER_PORT set by the batch script win; the job's node list serves without a step list
    overridden = {**slurm, "MASTER_ADDR": "login1", "MASTER_PORT": "4242"}
    assert DistEnv.from_environ(overridden) == DistEnv(3, 1, 4, "login1", 4242)
    del slurm["SLURM_STEP_NODELIST"]
    assert DistEnv.from_environ(slurm).master_addr == "gpu07"


def test_batch_script_without_srun_is_one_process():
    # sbatch --ntasks=2 running python directly: SLURM_NTASKS=2, but no srun step started a second task
    assert DistEnv.from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}) == DistEnv()
    assert DistEnv.from_environ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "2"}) == DistEnv()


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK=2 must be in 0..1"),
    ({"RANK": "zero", "WORLD_SIZE": "2"}, "RANK='zero' is not an integer"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR is not set"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "MASTER_PORT=70000 must be in"),
    ({"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_PROCID=2 must be in 0..1"),
    ({"SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "5"},
     "without a node list"),
    ({"SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "5",
      "SLURM_JOB_NODELIST": "n[1-"}, "SLURM_JOB_NODELIST: host list"),
])
def test_inconsistent_environments_are_refused(environ, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        DistEnv.from_environ(environ)


def test_bad_environment_fails_training_clearly(tiny_args, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args)
    assert exit_info.value.code == 2 and "RANK=5 must be in 0..1" in capsys.readouterr().err


def test_rank_devices():
    two = DistEnv(rank=1, local_rank=1, world_size=2, master_port=1)
    assert rank_device(torch.device("cpu"), two) == torch.device("cpu")
    with pytest.raises(ConfigError, match="names one GPU"):
        rank_device(torch.device("cuda:1"), two)
    if torch.cuda.device_count() < 8:
        with pytest.raises(ConfigError, match="only .* GPU"):
            rank_device(torch.device("cuda"), DistEnv(rank=8, local_rank=8, world_size=9, master_port=1))


def test_evaluation_shards_hold_every_sample_once():
    data = list(range(10))
    shards = [list(rank_shard(data, rank, 3)) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == data and rank_shard(data, 0, 1) is data


# --- SyncBatchNorm2d: statistics merged over ranks with different batch sizes --------------------------


def test_sync_batchnorm_matches_batchnorm_over_the_whole_batch(tmp_path):
    mp.spawn(dist_workers.sync_bn_rank, args=(launch.free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, upstream, weight, bias = dist_workers.sync_bn_inputs()
    bn = dist_workers.batchnorm(weight, bias)
    whole = x.clone().requires_grad_()
    (bn(whole) * upstream).sum().backward()
    # the same float32 arithmetic in another order: agreement to a few float32 epsilons of the values' scale
    close = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in ranks]), whole.grad, **close)
    torch.testing.assert_close(ranks[0]["grad_weight"] + ranks[1]["grad_weight"], bn.weight.grad, **close)
    torch.testing.assert_close(ranks[0]["grad_bias"] + ranks[1]["grad_bias"], bn.bias.grad, **close)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], bn.running_mean, **close)
        torch.testing.assert_close(r["running_var"], bn.running_var, **close)


def test_sync_batchnorm_is_batchnorm_without_process_group():
    bn = nn.BatchNorm2d(4)
    synced = convert_sync_batchnorm(nn.BatchNorm2d(4))
    synced.load_state_dict(bn.state_dict())
    x = torch.randn(6, 4, 3, 3)
    assert torch.equal(synced(x), bn(x)) and torch.equal(synced.running_var, bn.running_var)
    assert torch.equal(synced.eval()(x), bn.eval()(x))


# --- (b) a 2-rank run end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rank_run(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path, str]:
    """A finished `launch --nproc 2` run (3 epochs, 2 x 50 images per step): its args, directory and stdout."""
    run = tmp_path_factory.mktemp("two-ranks") / "run"
    args = ["--model", "vgg08", "--variant", "bn_rc", "--filters", "8", "--data-dir", str(cifar_dir),
            "--no-verify-checksums", "--val-size", "100", "--batch-size", "50", "--epochs", "3", "--workers", "0",
            "--device", "cpu", "--deterministic", "--seed", "3", "--no-progress", "--out-dir", str(run)]
    result = run_launch([*TWO_CPU_RANKS, *args])
    assert result.returncode == 0, result.stdout + result.stderr
    return args, run, result.stdout


def test_two_cpu_ranks_train_and_only_rank0_writes(two_rank_run):
    args, run, stdout = two_rank_run
    # rank 0 alone prints (and writes: its prints sit next to its writes), once per epoch
    assert [len(re.findall(rf"\] epoch {e}/3 ", stdout)) for e in (1, 2, 3)] == [1, 1, 1]
    assert stdout.count("] test loss") == 1
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == [
        "checkpoints", "checkpoints/best.pt", "checkpoints/epoch-0002.pt", "checkpoints/epoch-0003.pt",
        "config.json", "gradflow.json", "metrics.jsonl", "summary.csv", "test.json"]
    config = json.loads((run / "config.json").read_text())
    assert (config["world_size"], config["batch_size"], config["global_batch_size"]) == (2, 50, 100)
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(0 < r["train_loss"] < 10 and 0 <= r["train_acc"] <= 100 and 0 < r["val_loss"] < 10 for r in rows)
    flow = json.loads((run / "gradflow.json").read_text())
    assert [e["steps"] for e in flow["epochs"]] == [5, 5, 5]  # 500 images in global batches of 2 x 50
    assert all(e["diagnosis"]["status"] == "healthy" for e in flow["epochs"])

    # metrics of the sharded evaluation equal a single-process evaluation of the saved weights
    trainer = Trainer(TrainConfig(**vars(build_parser().parse_args(args))), torch.device("cpu"))
    trainer.model.load_state_dict(load_checkpoint(run / "checkpoints" / "epoch-0003.pt")["model"])
    val_loss, val_acc = trainer.evaluate(trainer.splits.val, "validation")
    assert (rows[-1]["val_loss"], rows[-1]["val_acc"]) == (pytest.approx(val_loss, rel=1e-6), val_acc)
    trainer.model.load_state_dict(load_checkpoint(run / "checkpoints" / "best.pt", ("epoch",))["model"])
    test_loss, test_acc = trainer.evaluate(trainer.splits.test, "test")
    test = json.loads((run / "test.json").read_text())
    assert (test["test_loss"], test["test_acc"]) == (pytest.approx(test_loss, rel=1e-6), test_acc)


def test_checkpoints_of_two_ranks_load_in_one_process_but_resume_with_two(two_rank_run, capsys):
    _, run, _ = two_rank_run
    model = make_model(TrainConfig(model="vgg08", variant="bn_rc", filters=8))
    model.load_state_dict(load_checkpoint(run / "checkpoints" / "best.pt", ("epoch",))["model"])  # plain names
    with pytest.raises(SystemExit) as exit_info:
        main(["--out-dir", str(run), "--resume", "--no-progress"])
    assert exit_info.value.code == 2
    assert "was trained by 2 rank(s) (global batch 2 x 50); this run has 1" in capsys.readouterr().err


# --- (c) 2 ranks x 50 images = 1 rank x 100 images -----------------------------------------------------


def two_steps(cifar_dir: Path, out: Path, *, impl: str, ranks: int, sync_bn: bool) -> dict:
    """Two SGD steps (one per epoch) of VGG08 BN+RC on the same 100 images, split over `ranks` processes.

    Returns rank 0's view: per-epoch metrics, the first step's gradients (SGD's momentum
    buffers after one step), the weights and BN running statistics after two steps, and the
    per-epoch gradient statistics. No augmentation, so only the split of the batch differs.
    """
    args = ["--model", "vgg08", "--variant", "bn_rc", "--filters", "8", "--impl", impl, "--data-dir",
            str(cifar_dir), "--no-verify-checksums", "--val-size", "100", "--train-limit", "100", "--no-augment",
            "--optimizer", "sgd", "--epochs", "2", "--batch-size", str(100 // ranks), "--workers", "0",
            "--device", "cpu", "--deterministic", "--seed", "3", "--no-progress", "--keep-checkpoints", "0",
            # the layout the tolerances below were derived in (channels_last sums in another order)
            "--no-channels-last", "--out-dir", str(out), *(["--sync-bn"] if sync_bn else [])]
    if ranks == 1:
        assert main(args) == 0
    else:
        result = run_launch(["--nproc", str(ranks), *args])
        assert result.returncode == 0, result.stdout + result.stderr
    first, second = (load_checkpoint(out / "checkpoints" / f"epoch-{e:04d}.pt") for e in (1, 2))
    return {"metrics": without_timing(metrics(out)),
            "gradients": {i: s["momentum_buffer"] for i, s in first["optimizer"]["state"].items()},
            "state": second["model"], "gradflow": json.loads((out / "gradflow.json").read_text())["epochs"]}


def assert_same_training(got: dict, expected: dict) -> None:
    """Equal up to float32 rounding in a different order of summation (tolerances below)."""
    # Tolerance: the two runs do the same float32 arithmetic except for the order of sums
    # (per-rank partial sums, all-reduces, Chan's merge of per-rank BN moments vs a
    # two-pass variance). Each such sum of ~1e5 terms differs by a few float32 epsilons
    # (1.2e-7) relative to its magnitude; observed: <= 1.2e-5 relative. rtol 1e-4 leaves a
    # margin, yet a real error is far larger (per-rank BN statistics: ~1e-3..1e-2; a
    # gradient scaled by the world size: 1). atol is relative to the largest value of the
    # kind, for entries that are 0 in exact arithmetic and float noise here (the gradient
    # of a conv bias that BN removes again).
    def close(a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale)

    for name in ("train_loss", "val_loss"):
        assert [r[name] for r in got["metrics"]] == pytest.approx([r[name] for r in expected["metrics"]], rel=1e-5)
    for name in ("epoch", "lr", "train_acc", "val_acc"):
        assert [r[name] for r in got["metrics"]] == [r[name] for r in expected["metrics"]]
    grad_scale = max(g.abs().max().item() for g in expected["gradients"].values())
    for index, grad in expected["gradients"].items():
        close(got["gradients"][index], grad, grad_scale)
    for name, value in expected["state"].items():
        if value.is_floating_point():
            close(got["state"][name], value, value.abs().max().item())
        else:
            assert torch.equal(got["state"][name], value), name  # num_batches_tracked
    for got_epoch, epoch in zip(got["gradflow"], expected["gradflow"]):
        for statistic in ("mean_abs", "max_abs", "l2"):
            close(torch.tensor(got_epoch[statistic]), torch.tensor(epoch[statistic]), max(epoch[statistic]))


@pytest.mark.parametrize("impl", ["native", "fused"])
def test_two_ranks_with_sync_bn_train_like_one_rank_with_twice_the_batch(cifar_dir, tmp_path, impl):
    one = two_steps(cifar_dir, tmp_path / "one", impl=impl, ranks=1, sync_bn=False)
    two = two_steps(cifar_dir, tmp_path / "two", impl=impl, ranks=2, sync_bn=True)
    assert_same_training(two, one)
    # Without --sync-bn each rank normalises by its own 50 images: legitimately another training.
    unsynced = two_steps(cifar_dir, tmp_path / "unsynced", impl=impl, ranks=2, sync_bn=False)
    with pytest.raises(AssertionError):
        assert_same_training(unsynced, one)
    buffers = [name for name in one["state"] if name.endswith("running_mean")]
    assert any(not torch.allclose(unsynced["state"][n], one["state"][n], rtol=1e-4, atol=1e-4) for n in buffers)


# --- (d, e) failures: a rank dies, the user interrupts -------------------------------------------------


def test_killed_rank_fails_the_launch_fast_and_the_run_resumes_exactly(two_rank_run, tmp_path):
    reference_args, reference, _ = two_rank_run
    args = set_option(reference_args, "--out-dir", str(tmp_path / "run"))
    run = Path(option(args, "--out-dir"))
    proc = start_launch([*TWO_CPU_RANKS, *args])
    pids = rank_pids(proc)
    wait_for(run / "checkpoints" / "epoch-0001.pt", proc)
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - killed < 30
    assert proc.returncode == 128 + signal.SIGKILL, stderr
    assert f"rank 1 (pid {pids[1]}) failed: killed by signal SIGKILL; stopped the other ranks" in stderr
    assert not any(alive(pid) for pid in pids)
    completed = [r["epoch"] for r in metrics(run)]
    assert completed and completed[-1] < 3, "the kill came too late to interrupt training"

    resumed = run_launch([*TWO_CPU_RANKS, "--out-dir", str(run), "--resume", "--no-progress"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert without_timing(metrics(run)) == without_timing(metrics(reference))
    assert json.loads((run / "test.json").read_text()) == json.loads((reference / "test.json").read_text())
    assert not list(run.rglob("*.tmp"))


def test_failing_rank_stops_a_rank_blocked_in_a_collective(capsys):
    # rank 0 waits in an all-reduce for rank 1, which fails first: without the launcher it
    # would wait for gloo's 30-minute timeout
    script = ("import torch, torch.distributed as dist\n"
              "dist.init_process_group('gloo')\n"
              "if dist.get_rank() == 1:\n"
              "    raise RuntimeError('rank 1 gives up')\n"
              "dist.all_reduce(torch.ones(1))\n")
    start = time.monotonic()
    status = launch.run_ranks([[sys.executable, "-c", script]] * 2, launch.rank_environments(2, launch.free_port()))
    err = capsys.readouterr().err
    assert status == 1 and time.monotonic() - start < 30
    report = err.split("failed: exit code 1; stopped the other ranks. Its last lines of stderr:")
    assert len(report) == 2 and re.search(r"rank 1 \(pid \d+\) $", report[0])
    assert "RuntimeError: rank 1 gives up" in report[1]
    pids = [int(p) for p in re.search(r"started rank pids ([\d ]+)", err).group(1).split()]
    assert not any(alive(pid) for pid in pids)


def test_ctrl_c_stops_every_rank(tiny_args):
    args = set_option(tiny_args, "--epochs", "5")
    run = Path(option(args, "--out-dir"))
    proc = start_launch([*TWO_CPU_RANKS, *args])
    pids = rank_pids(proc)
    wait_for(run / "checkpoints" / "epoch-0001.pt", proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "SIGINT: stopping every rank" in stderr and "continue with the same command plus --resume" in stderr
    assert not any(alive(pid) for pid in pids)
    assert not list(run.rglob("*.tmp"))


# --- (f) bad input fails before any process starts -----------------------------------------------------


@pytest.mark.parametrize("launch_args, drop, add, message", [
    (["--nproc", "0"], [], [], "--nproc must be >= 1, got 0"),
    (["--gpus", str(torch.cuda.device_count() + 1)], ["--device"], [],
     "CUDA is not available on this machine" if not torch.cuda.is_available() else "GPU(s) are visible"),
    (["--gpus", "1"], [], [], "--gpus runs one process per GPU, but --device is cpu"),
    (["--nproc", "2"], ["--device"], ["--device", "cuda"], "--nproc starts CPU processes (gloo), but --device is cuda"),
    (["--nproc", "2", "--gpus", "1"], [], [], "--nproc and --gpus exclude each other"),
    ([], [], [], "choose where the ranks run: --nproc N"),
    (["--nproc", "2"], [], ["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--nproc", "2"], [], ["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_launches_fail_before_starting_ranks(tiny_args, capsys, launch_args, drop, add, message):
    args = list(tiny_args)
    for name in drop:  # leave the option (and its value) out
        del args[args.index(name):args.index(name) + 2]
    with pytest.raises(SystemExit) as exit_info:
        launch.main([*launch_args, *args, *add])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "started rank pids" not in err
