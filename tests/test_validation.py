"""Every bad option is refused with one `error:` line and exit status 2, before data and model are built."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest

from tests.helpers import set_option
from vggbench import launch
from vggbench.config import GROUPS, TrainConfig, flag
from vggbench.train import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PROG = "python -m vggbench.train: error: "


def refused(args: list[str], capsys) -> str:
    """Run vggbench.train on `args`; assert it exits 2 with one error line; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith(PROG), err
    return err.strip()


@pytest.mark.parametrize("change, message", [
    # finite values (D6)
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--eta-min", "nan"], "--eta-min must be a finite number, got nan"),
    (["--momentum", "inf"], "--momentum must be a finite number, got inf"),
    (["--negative-slope", "nan"], "--negative-slope must be a finite number, got nan"),
    (["--weight-decay=-inf"], "--weight-decay must be a finite number, got -inf"),
    # ranges
    (["--lr", "0"], "--lr must be > 0"),
    (["--momentum", "1.5"], "--momentum must be <= 1, got 1.5"),
    (["--negative-slope", "-0.1"], "--negative-slope must be >= 0"),
    (["--val-size", "0"], "--val-size must be >= 1, got 0"),  # D7
    (["--train-limit", "50"], "--train-limit must be >= 100, got 50"),
    (["--dist-timeout", "0"], "--dist-timeout must be >= 1, got 0"),
    (["--restart-period", "0"], "--restart-period must be >= 1, got 0"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints must be >= 0, got -1"),
    (["--gradflow-every", "-2"], "--gradflow-every must be >= 0, got -2"),
    (["--workers", "100000"], "--workers must be <= 256, got 100000"),
    (["--dataset", "synthetic", "--synthetic-test-size", "0"], "--synthetic-test-size must be >= 1, got 0"),
    # huge integers (D8)
    (["--seed", str(2**64)], f"--seed must be <= {2**63 - 1}, got {2**64}"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--split-seed", str(2**63)], f"--split-seed must be <= {2**63 - 1}"),
    (["--batch-size", "99999999999999999999"], "--batch-size must be <= 2147483647, got 99999999999999999999"),
    (["--filters", str(2**40)], "--filters must be <= 2147483647"),
    # sizes the model cannot run (D12)
    (["--stages", "6", "--model", "vgg14"], "--stages 6: every stage halves the 32x32 images, so at most 5 stages fit"),
    # the model's depth is checked against valid --stages and --convs-per-block only
    (["--stages", "0"], "--stages must be >= 1, got 0"),
    (["--stages", "-1"], "--stages must be >= 1, got -1"),
    (["--convs-per-block", "0"], "--convs-per-block must be >= 1, got 0"),
])
def test_bad_options_are_refused_before_anything_is_built(tiny_args, capsys, change, message):
    # a data directory that does not exist: the option's error comes first, nothing is read or written
    args = set_option(tiny_args, "--data-dir", "/nonexistent/cifar") + change
    assert message in refused(args, capsys)
    assert not Path(TrainConfig(**vars(build_parser().parse_args(args))).run_dir).exists()


@pytest.mark.parametrize("change, message", [
    # every batch, and the last batch of an epoch (500 images in batches of 499), give BatchNorm at 1x1
    # (after 5 stages) a single value per channel
    (["--model", "vgg12", "--stages", "5", "--batch-size", "1"], "every training batch holds 1 image(s)"),
    (["--model", "vgg12", "--stages", "5", "--batch-size", "499"],
     "the last training batch of every epoch (500 images per rank in batches of 499) holds 1 image(s)"),
])
def test_batches_batchnorm_cannot_normalise_are_refused_before_the_model_is_built(tiny_args, capsys, change,
                                                                                   message):
    line = refused(tiny_args + change, capsys)
    assert message in line and "needs more than one value per channel" in line
    run = Path(TrainConfig(**vars(build_parser().parse_args(tiny_args))).run_dir)
    assert not [p for p in run.rglob("*") if p.is_file()]


def test_plain_variants_take_any_batch(tiny_args):
    # without BatchNorm after the convs only the entry block normalises, over 32x32 values per image
    args = tiny_args + ["--model", "vgg12", "--stages", "5", "--variant", "plain", "--batch-size", "499",
                        "--epochs", "1"]
    assert main(args) == 0


@pytest.mark.parametrize("change, fix", [
    (["--filters", "100000"], "use fewer --filters or a smaller --batch-size"),
    (["--dataset", "synthetic", "--synthetic-train-size", "2000000000"], "use smaller --synthetic-train-size"),
])
def test_what_cannot_fit_in_memory_is_refused_up_front(tiny_args, capsys, change, fix):
    line = refused(set_option(tiny_args, "--data-dir", "/nonexistent/cifar") + change, capsys)
    assert "training needs at least" in line and f"GiB are free: {fix}" in line


@pytest.mark.parametrize("where, causes", [
    ("file", ["is a file, not a directory"]),
    ("below a file", ["Not a directory"]),
    # read-only for root too (EPERM); other users are refused by permissions first (EACCES)
    ("/sys/vggbench-run", ["Operation not permitted", "Permission denied"]),
])
def test_unwritable_run_directories_are_refused_before_the_data_is_read(tiny_args, tmp_path, capsys, where,
                                                                        causes):
    (tmp_path / "file").write_text("not a directory\n")
    out_dir = {"file": str(tmp_path / "file"), "below a file": str(tmp_path / "file" / "run")}.get(where, where)
    args = set_option(set_option(tiny_args, "--out-dir", out_dir), "--data-dir", "/nonexistent/cifar")
    line = refused(args, capsys)
    assert any(cause in line for cause in causes) and "choose another --out-dir" in line
    assert (tmp_path / "file").read_text() == "not a directory\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root; the /sys case covers it")
def test_a_read_only_run_directory_is_refused(tiny_args, tmp_path, capsys):
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    line = refused(set_option(tiny_args, "--out-dir", str(read_only / "run")), capsys)
    assert "--out-dir: cannot write into" in line and "Permission denied" in line


def test_running_out_of_memory_is_one_line(tiny_args):
    """A real allocation failure (the address space capped below what the batch needs) mid-epoch."""
    child = textwrap.dedent(f"""
        import resource, sys
        from vggbench.train import main
        size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.RLIM_INFINITY))
        sys.exit(main({tiny_args + ["--filters", "512", "--batch-size", "100"]!r}))
    """)
    result = subprocess.run([sys.executable, "-c", child], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=300, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(PROG + "out of memory (") and "no epoch was completed" in lines[0]


def test_help_groups_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    sections = text.split("\n\n")
    titles = [s.splitlines()[0] for s in sections]
    assert [t for t in titles if t.removesuffix(" options:") in GROUPS] == [f"{g} options:" for g in GROUPS]
    for f in fields(TrainConfig):
        section = next(s for s in sections if s.startswith(f"{f.metadata['group']} options:"))
        assert f"--{flag(f.name)}" in section, f.name


def test_the_launcher_refuses_a_nan_option_before_starting_ranks(tiny_args, capsys):
    """D6: not "rank 1 trains another configuration" (nan != nan) from the ranks, but the option itself."""
    with pytest.raises(SystemExit) as exit_info:
        launch.main(["--nproc", "2", *tiny_args, "--lr", "nan"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--lr must be a finite number, got nan" in err
    assert "started rank pids" not in err
