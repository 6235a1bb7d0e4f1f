"""The loss-landscape probe: its measures on a quadratic, filter normalisation, a training run it
leaves untouched, a surface over 2 gloo ranks equal to one process's, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.test_train import final_weights, metrics, option, set_option, without_timing
from vggbench.landscape import Grid, filter_normalized_direction, probe
from vggbench.landscape.__main__ import main as landscape_main
from vggbench.models import build_model
from vggbench.report import build_report
from vggbench.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]


class Quadratic(nn.Module):
    """L(theta) = 1/2 theta^T A theta (forward takes no input)."""

    def __init__(self, a: torch.Tensor, theta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.theta = nn.Parameter(theta.clone())

    def forward(self) -> torch.Tensor:
        return 0.5 * self.theta @ self.a @ self.theta


def spd_matrix(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(0.5, 20.0, n, dtype=torch.float64)) @ q.T


def test_quadratic_beta_is_the_curvature_along_an_eigen_gradient():
    a = spd_matrix(6, 0)
    eigenvalues, eigenvectors = torch.linalg.eigh(a)
    model = Quadratic(a, 3.0 * eigenvectors[:, 4])  # g = A theta = lambda theta: an eigen-direction
    g = a @ model.theta.detach()
    result = probe(model, lambda forward: forward(), lr=0.01)
    curvature = (g @ a @ g / (g @ g)).item()
    assert curvature == pytest.approx(eigenvalues[4].item(), rel=1e-12)
    assert result["beta_smoothness"] == pytest.approx(curvature, rel=1e-10)


def test_quadratic_predictiveness_losses_and_beta_equal_the_hand_computed_values():
    a = spd_matrix(5, 1)
    theta = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
    model = Quadratic(a, theta)
    lr, multipliers = 0.02, (0.5, 1.0, 3.0)
    result = probe(model, lambda forward: forward(), lr=lr, multipliers=multipliers)
    g = a @ theta
    # grad L(theta) - grad L(theta - lr s g) = lr s A g, so its norm is lr s ||A g||
    assert result["grad_diffs"] == pytest.approx([lr * s * torch.linalg.norm(a @ g).item() for s in multipliers],
                                                 rel=1e-10)
    expected_losses = [(0.5 * (theta - lr * s * g) @ a @ (theta - lr * s * g)).item() for s in multipliers]
    assert result["losses"] == pytest.approx(expected_losses, rel=1e-12)
    assert result["loss"] == pytest.approx((0.5 * theta @ a @ theta).item(), rel=1e-12)
    assert result["grad_norm"] == pytest.approx(torch.linalg.norm(g).item(), rel=1e-12)
    assert result["beta_smoothness"] == pytest.approx((torch.linalg.norm(a @ g) / torch.linalg.norm(g)).item(),
                                                      rel=1e-10)
    assert result["loss_band"] == pytest.approx([min(expected_losses), max(expected_losses)], rel=1e-12)
    assert torch.equal(model.theta.detach(), theta)  # the probe moved nothing


def test_probe_touches_no_parameter_gradient_or_bn_statistic():
    model = build_model("vgg08", "bn", filters=8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, targets = torch.randn(6, 3, 16, 16), torch.arange(6)
    probe(model, lambda forward: nn.functional.cross_entropy(forward(images), targets), lr=1e-3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats included
    assert all(p.grad is None for p in model.parameters())


def test_filter_normalisation_gives_each_direction_filter_its_weight_filters_norm():
    model = build_model("vgg08", "bn_rc", filters=8)
    direction = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    checked = 0
    for name, param in model.named_parameters():
        d = direction[name]
        if param.dim() <= 1:  # BN weights and biases, conv and linear biases
            assert torch.count_nonzero(d) == 0, name
            continue
        for w_filter, d_filter in zip(param.detach(), d):
            assert torch.linalg.norm(d_filter).item() == pytest.approx(torch.linalg.norm(w_filter).item(), rel=1e-5)
            checked += 1
    assert checked == 7 * 8 + 100  # 7 convs of 8 filters, the classifier's 100 rows


def test_probe_leaves_training_identical_and_resume_exact(tiny_args, tmp_path):
    plain = set_option(tiny_args, "--out-dir", str(tmp_path / "plain"))
    probed = [*set_option(tiny_args, "--out-dir", str(tmp_path / "probed")), "--landscape-every", "1"]
    assert train_main(plain) == 0 and train_main(probed) == 0
    a, b = Path(option(plain, "--out-dir")), Path(option(probed, "--out-dir"))
    assert without_timing(metrics(a)) == without_timing(metrics(b))
    weights_a, weights_b = final_weights(a), final_weights(b)
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert not (a / "landscape.json").exists()
    landscape = json.loads((b / "landscape.json").read_text())
    assert [e["epoch"] for e in landscape["epochs"]] == [1, 2, 3] and landscape["batch_size"] == 50
    for epoch, row in zip(landscape["epochs"], metrics(b)):
        assert epoch["lr"] == pytest.approx(row["lr"])  # the lr the epoch trained with
        assert epoch["loss_band"][0] <= epoch["loss_band"][1] and epoch["beta_smoothness"] > 0

    # resume from epoch 2: the landscape history continues exactly
    (b / "checkpoints" / "epoch-0003.pt").unlink()
    assert train_main([*probed, "--resume"]) == 0
    assert json.loads((b / "landscape.json").read_text()) == landscape
    assert without_timing(metrics(b)) == without_timing(metrics(a))


@pytest.fixture(scope="module")
def trained_run(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch tiny run (VGG08 BN+RC, 8 filters) on the fake CIFAR-100 files."""
    run = tmp_path_factory.mktemp("landscape") / "run"
    assert train_main(["--model", "vgg08", "--variant", "bn_rc", "--filters", "8", "--data-dir", str(cifar_dir),
                       "--no-verify-checksums", "--val-size", "100", "--batch-size", "50", "--epochs", "1",
                       "--workers", "0", "--device", "cpu", "--seed", "5", "--no-progress",
                       "--out-dir", str(run)]) == 0
    return run


def run_landscape(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "vggbench.landscape", *args], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=300)


def test_surface_over_two_gloo_ranks_equals_one_process(trained_run, tmp_path):
    """One process, 2 local gloo ranks (--nproc 2), and 2 tasks of a submitit job (--slurm through its
    local executor, the path a SLURM job takes without the cluster) give the same surface."""
    common = ["surface", str(trained_run), "--resolution", "3", "--samples", "40", "--batch-size", "20",
              "--no-progress"]
    ways = {"one": [], "two": ["--nproc", "2"],
            "submitit": ["--slurm", "--executor", "local", "--ntasks-per-node", "2", "--time", "10", "--wait"]}
    for name, extra in ways.items():
        done = run_landscape(*common, "--out", str(tmp_path / f"{name}.json"), *extra)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b, c = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ways)
    assert (a["world_size"], b["world_size"], c["world_size"]) == (1, 2, 2)
    assert len(a["loss"]) == 9 and a["loss"] == b["loss"] == c["loss"] and a["acc"] == b["acc"] == c["acc"]
    assert a["coords"][4] == [0.0, 0.0]  # the centre: the checkpoint itself
    assert (tmp_path / "two.png").read_bytes().startswith(b"\x89PNG")


def test_plot_and_report_show_the_probe(tiny_args, trained_run, tmp_path):
    probed = [*set_option(tiny_args, "--epochs", "2"), "--landscape-every", "2"]
    assert train_main(probed) == 0
    run = Path(option(probed, "--out-dir"))
    assert landscape_main(["plot", str(run), str(run), "--out", str(tmp_path / "plots")]) == 0
    for png in (run / "landscape.png", tmp_path / "plots" / "landscape-compare.png"):
        assert png.read_bytes().startswith(b"\x89PNG"), png
    last = json.loads((run / "landscape.json").read_text())["epochs"][-1]
    assert last["epoch"] == 2
    table = build_report([run, trained_run]).markdown.splitlines()
    assert table[0].endswith("| β-smoothness | loss band |")
    assert table[2].endswith(f"| {last['beta_smoothness']:.3g} | {last['loss_band'][1] - last['loss_band'][0]:.3g} |")
    assert table[3].endswith("| n/a | n/a |")  # trained without the probe
    assert "β-smoothness" not in build_report([trained_run]).markdown  # no columns when no run has them


@pytest.mark.parametrize("extra, message", [
    (["--range", "1", "1"], "coordinate range [1, 1] is empty"),
    (["--resolution", "0"], "resolution must be >= 1"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--samples", "100000"], "has only 100 images"),
    (["--out", "/proc/no-such-dir/surface.json"], "--out: cannot write into /proc/no-such-dir"),
])
def test_bad_surface_values_are_clear_errors(trained_run, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        landscape_main(["surface", str(trained_run), "--no-progress", "--resolution", "2", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_run_dir_without_checkpoints_or_probe_is_a_clear_error(trained_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((trained_run / "config.json").read_text())
    with pytest.raises(SystemExit) as exit_info:
        landscape_main(["surface", str(empty)])
    assert exit_info.value.code == 2 and "holds no epoch checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        landscape_main(["plot", str(trained_run)])  # trained without the probe
    assert exit_info.value.code == 2 and "train with --landscape-every N" in capsys.readouterr().err


def test_empty_step_range_and_bad_lr_are_clear_errors():
    model = Quadratic(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="step range is empty"):
        probe(model, lambda forward: forward(), lr=0.1, multipliers=())
    with pytest.raises(ValueError, match="must be finite and > 0"):
        probe(model, lambda forward: forward(), lr=0.1, multipliers=(1.0, -2.0))
    with pytest.raises(ValueError, match="learning rate must be finite and > 0"):
        probe(model, lambda forward: forward(), lr=0.0)
    with pytest.raises(ValueError, match="1 or 2 dimensions"):
        Grid(3, 5)


def test_plot_into_an_unwritable_out_is_a_clear_error(trained_run, tmp_path, capsys):
    (tmp_path / "a-file").write_text("in the way\n")
    with pytest.raises(SystemExit) as exit_info:
        landscape_main(["plot", str(trained_run), "--out", str(tmp_path / "a-file")])
    assert exit_info.value.code == 2
    assert f"--out: {tmp_path / 'a-file'} is a file, not a directory" in capsys.readouterr().err
