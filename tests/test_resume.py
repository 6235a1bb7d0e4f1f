"""vggbench.resume: --resume is added exactly when the run directory holds epoch checkpoints."""

from __future__ import annotations

from vggbench.resume import resumable_argv


def test_resume_is_added_only_when_there_are_epoch_checkpoints(tmp_path):
    argv = ["--model", "vgg08", "--out-dir", str(tmp_path / "run")]
    assert resumable_argv(argv) == argv  # a fresh run
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "best.pt").touch()
    assert resumable_argv(argv) == argv  # best.pt alone is no epoch to continue from
    (tmp_path / "run" / "checkpoints" / "epoch-0003.pt").touch()
    assert resumable_argv(argv) == [*argv, "--resume"]
    given = [*argv, "--resume", str(tmp_path / "run" / "checkpoints" / "epoch-0003.pt")]
    assert resumable_argv(given) == given  # an explicit --resume is kept as it is


def test_the_default_run_directory_counts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "vgg08-bn-lr0.01-seed5" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "vgg08-bn-lr0.01-seed5" / "checkpoints" / "epoch-0001.pt").touch()
    argv = ["--model", "vgg08", "--variant", "bn", "--lr", "0.01", "--seed", "5"]
    assert resumable_argv(argv) == [*argv, "--resume"]
    assert resumable_argv([*argv[:-1], "6"]) == [*argv[:-1], "6"]
