"""Run-directory integrity: interrupted writes, foreign results, stale temporaries, held signals.

A kill can only leave states an atomic write allows (each file old or new, never torn),
in the order vggbench.run_dir writes them; the tests build those states from a real run,
or interrupt real processes with real signals, and check that resuming repairs them and
gives the uninterrupted run's results.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import metrics, set_option, without_timing
from vggbench.checkpoint import (
    WriteError,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
)
from vggbench.config import ConfigError, TrainConfig
from vggbench.resume import resume_state
from vggbench.run_dir import RunDir
from vggbench.train import main

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # the thread count of the in-process reference run


@pytest.fixture(scope="module")
def finished(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """A finished 2-epoch run that kept every epoch checkpoint: its options and directory."""
    run = tmp_path_factory.mktemp("finished") / "run"
    args = ["--model", "vgg08", "--variant", "bn_rc", "--filters", "8", "--data-dir", str(cifar_dir),
            "--no-verify-checksums", "--val-size", "100", "--batch-size", "50", "--epochs", "2", "--workers", "0",
            "--device", "cpu", "--deterministic", "--seed", "3", "--no-progress", "--keep-checkpoints", "0",
            "--out-dir", str(run)]
    assert main(args) == 0
    return args, run


def copy_run(run: Path, to: Path, *, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(run, to)
    for name in drop:
        (to / name).unlink()
    return to


def digest(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}


def resume(run: Path) -> int:
    return main(["--out-dir", str(run), "--resume", "--no-progress"])


def assert_agrees_with(run: Path, reference: Path) -> None:
    """Same metrics and test result; best.pt holds the weights the newest epoch checkpoint names."""
    assert without_timing(metrics(run)) == without_timing(metrics(reference))
    assert json.loads((run / "test.json").read_text()) == json.loads((reference / "test.json").read_text())
    newest = load_checkpoint(max((run / "checkpoints").glob("epoch-*.pt")))
    best = load_checkpoint(run / "checkpoints" / "best.pt", ("epoch", "model"))
    assert best["epoch"] == newest["history"]["best"]["epoch"]
    assert all(torch.equal(best["model"][k], v) for k, v in newest["best_model"].items())
    assert not list(run.rglob("*.tmp"))


def test_epoch_checkpoints_carry_the_best_weights_and_best_pt_agrees(finished):
    _, run = finished
    for path in sorted((run / "checkpoints").glob("epoch-*.pt")):
        state = load_checkpoint(path)
        best_epoch = state["history"]["best"]["epoch"]
        assert 1 <= best_epoch <= state["epoch"]
        assert state["best_model"].keys() == state["model"].keys()
    best = load_checkpoint(run / "checkpoints" / "best.pt", ("epoch", "model"))
    assert json.loads((run / "test.json").read_text())["best_epoch"] == best["epoch"]


@pytest.mark.parametrize("damage", ["older", "missing", "torn"])
def test_resume_repairs_best_pt_up_front(finished, tmp_path, capsys, damage):
    """D1 (a kill during best.pt's write leaves an older one), D2 (none yet), D3 (a torn one)."""
    _, reference = finished
    run = copy_run(reference, tmp_path / "run", drop=("test.json",))
    best = run / "checkpoints" / "best.pt"
    if damage == "older":  # another epoch's weights, as a kill between two writes of best.pt could leave
        other_epoch = 3 - load_checkpoint(run / "checkpoints" / "epoch-0002.pt")["history"]["best"]["epoch"]
        other = load_checkpoint(run / "checkpoints" / f"epoch-{other_epoch:04d}.pt")
        save_checkpoint({"epoch": other_epoch, "val_acc": 0.0, "config": other["config"], "model": other["model"]},
                        best)
    elif damage == "missing":
        best.unlink()
    else:
        best.write_bytes(best.read_bytes()[:500])
    assert resume(run) == 0
    out = capsys.readouterr().out
    assert "best.pt" in out and "rewritten from the epoch-0002 checkpoint" in out
    assert_agrees_with(run, reference)


def test_resume_after_a_kill_between_the_epoch_checkpoint_and_the_rest(finished, tmp_path):
    """A kill after epoch-0001.pt: no best.pt, no metrics yet, stale temporaries (D2, D9); training continues."""
    _, reference = finished
    run = copy_run(reference, tmp_path / "run", drop=("checkpoints/epoch-0002.pt", "checkpoints/best.pt",
                                                       "test.json", "metrics.jsonl", "summary.csv"))
    stale = [run / ".metrics.jsonl.k1ll3d.tmp", run / "checkpoints" / ".epoch-0002.pt.x7y8z9.tmp"]
    for path in stale:
        path.write_bytes(b"half a write")
    assert resume(run) == 0
    assert_agrees_with(run, reference)
    assert not any(path.exists() for path in stale)


def test_sigkill_during_an_epoch_checkpoint_write_loses_nothing(finished, tmp_path):
    args, reference = finished
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "vggbench.train", *set_option(args, "--out-dir", str(run))],
                            env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list((run / "checkpoints").glob(".epoch-0002.pt.*.tmp")):  # the write is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.0005)
    proc.kill()
    proc.wait()
    assert not (run / "checkpoints" / "epoch-0002.pt").exists() and list(run.rglob("*.tmp"))
    assert resume(run) == 0
    assert_agrees_with(run, reference)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_signals_wait_for_the_whole_epoch_write(tmp_path, sig):
    """A signal at a random moment of the epoch's writes acts once all of them are done."""
    run = tmp_path / "run"
    child = textwrap.dedent(f"""
        import signal, torch
        from vggbench.run_dir import RunDir
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as usual, even if the tests ignore it
        weights = {{"w": torch.arange(2**24, dtype=torch.float32)}}  # 64 MB: writes take a while
        history = {{"metrics": [], "gradflow": {{"layers": [], "epochs": []}}, "best": {{"epoch": 1, "val_acc": 5.0}}}}
        state = {{"epoch": 1, "config": {{}}, "model": weights, "best_model": weights, "history": history}}
        RunDir({str(run)!r}).write_epoch(state, {{"lr": 0.1}}, "synthetic", keep=2)
        print("finished the writes")
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], env=CHILD_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((run / "checkpoints").glob(".*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.0005)
    time.sleep(random.uniform(0, 0.05))
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert "finished the writes" not in out  # the signal still acted, after the writes
    assert proc.returncode == -sig, err  # Python ends an uncaught KeyboardInterrupt by SIGINT too
    assert ("KeyboardInterrupt" in err) == (sig == signal.SIGINT)
    assert load_checkpoint(run / "checkpoints" / "epoch-0001.pt", ("epoch", "best_model"))["epoch"] == 1
    assert load_checkpoint(run / "checkpoints" / "best.pt", ("epoch", "model"))["epoch"] == 1
    assert json.loads((run / "config.json").read_text()) == {"lr": 0.1}
    assert (run / "gradflow.json").exists() and not list(run.rglob("*.tmp"))


def test_resume_refuses_another_runs_checkpoint(finished, tmp_path, capsys):
    """D4: --out-dir A --resume B/checkpoints/...: refused, A untouched."""
    _, other = finished
    run = copy_run(other, tmp_path / "a")
    before = digest(run)
    with pytest.raises(SystemExit) as exit_info:
        main(["--out-dir", str(run), "--resume", str(other / "checkpoints" / "epoch-0001.pt")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"is not a checkpoint of the run in {run}" in err and f"--out-dir {other} --resume" in err
    assert digest(run) == before


def test_resume_names_a_run_directory_not_a_file(finished, tmp_path, capsys):
    """--resume DIR: another run's directory is refused with the command that continues it; this
    run's own directory (or its checkpoints folder) means its newest checkpoint."""
    _, other = finished
    run = copy_run(other, tmp_path / "a")
    before = digest(run)
    with pytest.raises(SystemExit) as exit_info:
        main(["--out-dir", str(run), "--resume", str(other)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"--resume {other} is a directory, not a checkpoint file" in err and f"--out-dir {other} --resume" in err
    assert digest(run) == before
    for named in (run, run / "checkpoints"):
        assert RunDir(str(run)).resume_checkpoint(str(named)) == run / "checkpoints" / "epoch-0002.pt"


@pytest.mark.parametrize("files", [
    ["config.json", "metrics.jsonl", "summary.csv"],  # a user's own files, or results without checkpoints
    ["test.json"],
    ["checkpoints/best.pt"],
])
def test_fresh_run_never_overwrites_results(tmp_path, capsys, files):
    """D5: results but no epoch checkpoint: refused before anything is written."""
    run = tmp_path / "run"
    for name in files:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("mine\n")
    before = digest(run)
    with pytest.raises(ConfigError, match="holds results .* but no epoch checkpoint"):
        resume_state(TrainConfig(out_dir=str(run)), None)
    assert digest(run) == before


def test_fresh_run_accepts_a_directory_without_results(tmp_path):
    """An empty directory, submitit's logs and a killed write's temporary are no results (the temporary goes)."""
    run = tmp_path / "run"
    (run / ".submitit").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    stale = run / "checkpoints" / ".epoch-0001.pt.abc.tmp"
    stale.write_bytes(b"torn")
    cfg = TrainConfig(out_dir=str(run))
    assert resume_state(cfg, None) == (cfg, None)
    assert RunDir(run).remove_temporaries() == [stale] and not stale.exists()


def test_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path):
    target = tmp_path / "state.pt"
    target.write_bytes(b"previous")

    def write_to_a_full_disk(f):
        with open("/dev/full", "wb") as full:  # the kernel answers ENOSPC, as a full disk does
            torch.save({"w": torch.zeros(10_000)}, full)

    with pytest.raises(WriteError) as info:
        atomic_write(target, write_to_a_full_disk)
    assert str(info.value) == f"could not write {target}: No space left on device (ENOSPC)"
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_training_on_a_full_disk_says_so_and_resumes_once_there_is_room(finished, tmp_path):
    """A run directory on a small tmpfs (a user and mount namespace: no root needed) fills up in epoch 2."""
    args, reference = finished
    script = tmp_path / "full_disk.sh"
    script.write_text(textwrap.dedent(f"""
        set -e
        run={tmp_path}/small
        mkdir -p $run
        mount -t tmpfs -o size=$1 tmpfs $run
        {sys.executable} -m vggbench.train {' '.join(set_option(args, '--out-dir', '$run/run'))} && exit 0 || status=$?
        cp -a $run/run {tmp_path}/saved
        exit $status
    """))
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False).returncode:
        pytest.skip("needs unprivileged user namespaces (unshare -rm) to mount a small file system")
    epoch_1 = sum(p.stat().st_size for p in reference.rglob("*") if p.is_file() and "0002" not in p.name)
    room = epoch_1 + (reference / "checkpoints" / "epoch-0002.pt").stat().st_size // 2  # not for epoch 2's
    result = subprocess.run(["unshare", "-rm", "bash", str(script), str(room)], env=CHILD_ENV,
                            capture_output=True, text=True, timeout=300, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "No space left on device (ENOSPC)" in lines[-1] and "epoch-0001.pt is intact" in lines[-1]
    saved = tmp_path / "saved"
    assert load_checkpoint(saved / "checkpoints" / "epoch-0001.pt")["epoch"] == 1
    assert resume(saved) == 0
    assert_agrees_with(saved, reference)
