"""Training end to end on CIFAR-100 files in the real format: outputs, exact resume, kills, corruption, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from tests.helpers import metrics, option, set_option, without_timing
from vggbench import plot, report
from vggbench.checkpoint import atomic_write, load_checkpoint
from vggbench.config import TrainConfig, flag
from vggbench.train import METRIC_COLUMNS, main, make_model


def final_weights(run: Path) -> dict:
    newest = max((run / "checkpoints").glob("epoch-*.pt"))
    return load_checkpoint(newest)["model"]


def test_short_run_writes_metrics_gradflow_checkpoints_plots_and_report(tiny_args, tmp_path):
    assert main(tiny_args) == 0
    run = Path(option(tiny_args, "--out-dir"))
    config = json.loads((run / "config.json").read_text())
    assert config["label"] == "VGG08 BN+RC" and config["dataset"] == "cifar100" and config["lr"] == 1e-3
    model = make_model(TrainConfig(model="vgg08", variant="bn_rc", filters=8))
    assert config["num_params"] == sum(p.numel() for p in model.parameters())
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and set(rows[0]) == set(METRIC_COLUMNS)
    assert all(0 <= r["train_acc"] <= 100 and r["train_loss"] > 0 for r in rows)
    # cosine annealing from 1e-3 to 2e-5 over 3 epochs, stepped per epoch
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[2]["lr"] == pytest.approx(2e-5 + (1e-3 - 2e-5) * 0.25)
    csv_lines = (run / "summary.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(METRIC_COLUMNS) and len(csv_lines) == 4

    flow = json.loads((run / "gradflow.json").read_text())
    names = [layer["name"] for layer in flow["layers"]]
    assert names[0] == "features.0.conv.weight" and names[-1] == "classifier.bias"
    assert len(names) == 7 + 6 + 7 * 2 + 2  # conv weights, reduction conv biases, BN weight+bias, linear
    for epoch in flow["epochs"]:
        assert epoch["steps"] == 10  # 500 images / batch 50
        assert all(len(epoch[s]) == len(names) for s in ("mean_abs", "max_abs", "l2"))
        assert all(m <= x for m, x in zip(epoch["mean_abs"], epoch["max_abs"]))
        assert epoch["diagnosis"]["status"] == "healthy"

    test = json.loads((run / "test.json").read_text())
    best = load_checkpoint(run / "checkpoints" / "best.pt", ("epoch",))
    assert test["best_epoch"] == best["epoch"] == max(rows, key=lambda r: r["val_acc"])["epoch"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "epoch-0002.pt", "epoch-0003.pt"]

    assert plot.main([str(run), str(run), "--out", str(tmp_path / "plots")]) == 0
    for png in (run / "gradflow.png", run / "curves.png", tmp_path / "plots" / "compare.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.main([str(run), "--out", str(tmp_path / "report.md")]) == 0
    assert "| VGG08 BN+RC |" in (tmp_path / "report.md").read_text()


def test_gradient_flow_windows(tiny_args):
    args = set_option(tiny_args, "--epochs", "1") + ["--gradflow-every", "4"]
    assert main(args) == 0
    flow = json.loads((Path(option(args, "--out-dir")) / "gradflow.json").read_text())
    assert [(w["step_start"], w["step_end"]) for w in flow["windows"]] == [(1, 4), (5, 8)]


def test_resume_continues_exactly(tiny_args, tmp_path):
    uninterrupted = tiny_args + ["--keep-checkpoints", "0"]
    assert main(uninterrupted) == 0
    full = Path(option(tiny_args, "--out-dir"))
    # a copy of the run rolled back to its state after epoch 1
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for later in ("checkpoints/epoch-0002.pt", "checkpoints/epoch-0003.pt", "test.json"):
        (resumed / later).unlink()
    assert main(["--out-dir", str(resumed), "--resume", "--no-progress"]) == 0
    assert without_timing(metrics(resumed)) == without_timing(metrics(full))
    assert json.loads((resumed / "gradflow.json").read_text())["epochs"] == \
        json.loads((full / "gradflow.json").read_text())["epochs"]
    for name, tensor in final_weights(full).items():
        assert torch.equal(tensor, final_weights(resumed)[name]), name
    assert json.loads((resumed / "test.json").read_text()) == json.loads((full / "test.json").read_text())


def start_training_and_wait_for_first_epoch(args: list[str]) -> subprocess.Popen:
    """`python -m vggbench.train ARGS` in a child process, once its first checkpoint exists."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "vggbench.train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = Path(option(args, "--out-dir")) / "checkpoints" / "epoch-0001.pt"
    deadline = time.monotonic() + 120
    while not first.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.02)
    return proc


def test_ctrl_c_exits_cleanly_and_says_how_to_resume(tiny_args):
    proc = start_training_and_wait_for_first_epoch(set_option(tiny_args, "--epochs", "5"))
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert f"--out-dir {option(tiny_args, '--out-dir')} --resume" in output and "Traceback" not in output


def test_killed_run_resumes_without_losing_epochs(tiny_args, tmp_path):
    args = set_option(tiny_args, "--epochs", "5")  # room to be killed before the end
    run = Path(option(args, "--out-dir"))
    # reference: the same configuration, never interrupted
    reference = set_option(args, "--out-dir", str(tmp_path / "reference"))
    assert main(reference) == 0

    proc = start_training_and_wait_for_first_epoch(args)
    time.sleep(0.1)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    completed = [r["epoch"] for r in metrics(run)]
    assert completed and completed[-1] < 5, "the kill came too late to interrupt training"
    assert [int(p.stem.split("-")[1]) for p in sorted((run / "checkpoints").glob("epoch-*.pt"))][-1] == completed[-1]

    assert main(["--out-dir", str(run), "--resume", "--no-progress"]) == 0
    assert without_timing(metrics(run)) == without_timing(metrics(tmp_path / "reference"))
    assert not list(run.rglob("*.tmp"))


def test_corrupt_checkpoint_is_reported_and_previous_one_kept(tiny_args, capsys):
    args = set_option(tiny_args, "--epochs", "2")
    assert main(args) == 0
    ckpts = Path(option(args, "--out-dir")) / "checkpoints"
    newest, previous = ckpts / "epoch-0002.pt", ckpts / "epoch-0001.pt"
    previous_bytes = previous.read_bytes()
    newest.write_bytes(newest.read_bytes()[:1000])  # a torn write

    with pytest.raises(SystemExit) as exit_info:
        main(["--out-dir", option(args, "--out-dir"), "--resume", "--epochs", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is corrupt" in err and f"--resume {previous}" in err
    assert previous.read_bytes() == previous_bytes

    assert main(["--out-dir", option(args, "--out-dir"), "--resume", str(previous), "--no-progress"]) == 0
    assert load_checkpoint(newest)["epoch"] == 2


def test_fresh_run_refuses_to_overwrite_and_resume_refuses_changes(tiny_args, capsys):
    args = set_option(tiny_args, "--epochs", "1")
    assert main(args) == 0
    for argv, message in [
        (args, "already holds a run's checkpoints: continue it with --resume"),
        (set_option(args, "--seed", "4") + ["--resume"], "cannot change a run's configuration on --resume: --seed 4"),
        (args + ["--no-deterministic", "--resume"], "--no-deterministic (run has --deterministic)"),  # as typed
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--lr", "-0.1"], "--lr must be >= 0"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--model", "vgg39"], "valid depths are 8 + 6k"),
        (["--model", "resnet50"], "model name must look like"),
        (["--eta-min", "0.5"], "--eta-min (0.5) must not exceed --lr"),
        (["--device", "cuda"], "CUDA is not available on this machine"),
        (["--device", "tpu"], "--device 'tpu' is not a device"),
        (["--precision", "fp16"], "fp16 needs a CUDA device"),
        (["--val-size", "150"], "val_size must be a multiple of the number of classes (100)"),
        (["--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar/cifar-100-python"),
        (["--verify-checksums"], "MD5"),
        (["--resume"], "no checkpoint to resume from"),
        (["--resume", "/nonexistent.pt"], "checkpoint /nonexistent.pt does not exist"),
    ],
)
def test_bad_values_give_clear_errors(tiny_args, capsys, change, message):
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args + change)
    assert exit_info.value.code == 2
    assert message.lower() in capsys.readouterr().err.lower()


@pytest.mark.parametrize("change", [["--variant", "bn+rc"], ["--batch-size", "many"], ["--optimizer", "lbfgs"]])
def test_argparse_rejects_malformed_values(tiny_args, capsys, change):
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args + change)
    assert exit_info.value.code == 2 and "invalid" in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert f"--{flag(f.name)}" in text


@pytest.mark.parametrize(
    "change",
    [
        ["--optimizer", "sgd", "--scheduler", "cosine_restarts", "--restart-period", "1"],
        ["--optimizer", "adamw", "--weight-decay", "1e-4", "--scheduler", "none"],
        ["--precision", "bf16", "--no-channels-last"],
        ["--variant", "plain", "--activation", "sigmoid", "--residual-reduction", "--workers", "1"],
        ["--variant", "bn", "--bn-position", "after", "--train-limit", "200", "--no-augment"],
    ],
)
def test_training_options_run(tiny_args, change):
    args = set_option(tiny_args, "--epochs", "1") + change
    assert main(args) == 0
    run = Path(option(args, "--out-dir"))
    (row,) = metrics(run)
    assert 0 < row["train_loss"] < 10 and (run / "test.json").exists()


def test_ctrl_c_during_a_write_is_delivered_after_it(tmp_path):
    target = tmp_path / "state.pt"

    def write_and_interrupt(f):
        f.write(b"first half ")
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives in the middle of the write
        f.write(b"second half")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write_and_interrupt)
    assert target.read_bytes() == b"first half second half"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
