"""Tests for vggbench.plot, vggbench.report and vggbench.runs on hand-built run directories."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from vggbench import plot, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (name, kind, param) in forward order, as vggbench.train records every parameter tensor.
LAYERS = [
    ("features.0.conv.weight", "conv", "weight"),
    ("features.0.conv.bias", "conv", "bias"),
    ("features.1.conv.weight", "conv", "weight"),
    ("features.1.conv.bias", "conv", "bias"),
    ("classifier.weight", "linear", "weight"),
    ("classifier.bias", "linear", "bias"),
]
VANISHING_GRADS = [1e-20, 0.0, 0.0, 0.0, 1e-3, 1e-3]
HEALTHY_GRADS = [1e-2, 2e-3, 5e-3, 1e-3, 2e-2, 4e-3]


def make_run(
    root: Path,
    name: str,
    *,
    label: str = "VGG08",
    lr: float = 1e-3,
    seed: int = 0,
    dataset: str = "cifar100",
    grads: list[float] = HEALTHY_GRADS,
    epochs: int = 3,
    test_acc: float | None = 40.0,
) -> Path:
    """Write a run directory following the contract; metric values depend on seed and epoch."""
    run = root / name
    run.mkdir(parents=True)
    config = {
        "model": label.split()[0].lower(), "variant": "plain", "label": label, "lr": lr,
        "weight_decay": 0.0, "batch_size": 100, "epochs": epochs, "seed": seed, "optimizer": "adam",
        "dataset": dataset, "num_params": 1234567, "device": f"cuda:{seed}", "out_dir": str(run),
        "workers": 2,
    }
    (run / "config.json").write_text(json.dumps(config))
    metrics = [
        {"epoch": e, "lr": lr, "train_loss": 4.0 / e + 0.1 * seed, "train_acc": 10.0 * e + seed,
         "val_loss": 4.5 / e + 0.2 * seed, "val_acc": 9.0 * e - seed, "epoch_time_s": 1.0, "images_per_s": 100.0}
        for e in range(1, epochs + 1)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))
    status = "vanishing" if grads == VANISHING_GRADS else "healthy"
    gradflow = {
        "layers": [{"name": n, "shape": [4, 4], "kind": k, "param": p} for n, k, p in LAYERS],
        "epochs": [
            {"epoch": e, "steps": 10, "mean_abs": [g * e for g in grads], "max_abs": [g * 3 for g in grads],
             "l2": [g * 2 for g in grads], "diagnosis": {"status": status, "ratio": 1.0, "rule": "test"}}
            for e in range(1, epochs + 1)
        ],
        "windows": [],
    }
    (run / "gradflow.json").write_text(json.dumps(gradflow))
    if test_acc is not None:
        test = {"best_epoch": epochs, "best_val_acc": 9.0 * epochs - seed, "test_loss": 1.5,
                "test_acc": test_acc + seed}
        (run / "test.json").write_text(json.dumps(test))
    return run


def assert_png(path: Path) -> None:
    """The file is a PNG with real content."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000


def test_plot_cli_writes_run_and_comparison_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vanishing = make_run(tmp_path, "vgg38", label="VGG38", grads=VANISHING_GRADS, dataset="synthetic")
    healthy = make_run(tmp_path, "vgg08", epochs=2)
    out = tmp_path / "cmp"
    assert plot.main([str(vanishing), str(healthy), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    for path in (vanishing / "gradflow.png", vanishing / "curves.png", healthy / "gradflow.png",
                 healthy / "curves.png", out / "compare.png"):
        assert_png(path)
        assert str(path) in printed
    assert str(out / "compare.json") in printed

    data = json.loads((out / "compare.json").read_text())
    assert data["grad_floor"] == plot.GRAD_FLOOR
    assert [r["label"] for r in data["runs"]] == ["VGG38 (synthetic data)", "VGG08"]
    weights = [i for i, (_, _, param) in enumerate(LAYERS) if param == "weight"]
    for entry, run_dir, grads, epochs in ((data["runs"][0], vanishing, VANISHING_GRADS, 3),
                                          (data["runs"][1], healthy, HEALTHY_GRADS, 2)):
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert entry["run_dir"] == str(run_dir)
        assert entry["epoch"] == list(range(1, epochs + 1))
        assert entry["val_loss"] == [row["val_loss"] for row in metrics]
        assert entry["val_acc"] == [row["val_acc"] for row in metrics]
        flow = entry["gradflow"]
        assert flow["epoch"] == epochs
        assert flow["layers"] == [LAYERS[i][0] for i in weights]
        assert flow["position"] == [0.0, 0.5, 1.0]
        assert flow["mean_abs"] == pytest.approx([max(grads[i] * epochs, plot.GRAD_FLOOR) for i in weights])
    assert data["runs"][0]["gradflow"]["status"] == "vanishing"


def test_gradient_flow_all_params_and_single_run(tmp_path: Path) -> None:
    run = make_run(tmp_path, "run", grads=VANISHING_GRADS, epochs=1)
    assert_png(plot.plot_gradient_flow(run, all_params=True))
    assert plot.main([str(run), "--out", str(tmp_path / "cmp")]) == 0
    assert not (tmp_path / "cmp").exists()  # one run: no comparison


def test_a_plot_interrupted_mid_write_keeps_the_previous_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(tmp_path, "run", epochs=1)
    before = plot.plot_gradient_flow(run).read_bytes()
    real_savefig = Figure.savefig

    def savefig_interrupted_after_1_kb(fig: Figure, file, **kwargs) -> None:
        class Interrupting:  # matplotlib writes the real PNG's first kilobyte, then Ctrl-C arrives
            def write(self, data: bytes) -> int:
                if file.tell() + len(data) > 1024:
                    file.write(data[:1024 - file.tell()])
                    raise KeyboardInterrupt
                return file.write(data)

        real_savefig(fig, Interrupting(), **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig_interrupted_after_1_kb)
    with pytest.raises(KeyboardInterrupt):
        plot.plot_gradient_flow(run, all_params=True)
    assert (run / "gradflow.png").read_bytes() == before
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # no temporary left


def test_report_mean_std_over_seeds_and_separate_lr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seeds = [0, 1, 2]
    runs = [make_run(tmp_path, f"s{seed}", seed=seed) for seed in seeds]
    other_lr = make_run(tmp_path, "lr", lr=1e-2, seed=5)
    out = tmp_path / "out" / "report.md"
    assert report.main([str(runs[0]), str(other_lr), *map(str, runs[1:]), "--out", str(out)]) == 0

    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(row["lr"], row["seeds"]) for row in rows] == [(1e-3, 3), (1e-2, 1)]
    last = [json.loads(path.joinpath("metrics.jsonl").read_text().splitlines()[-1]) for path in runs]
    tests = [json.loads(path.joinpath("test.json").read_text())["test_acc"] for path in runs]
    expected = {key: [row[key] for row in last] for key in ("train_loss", "train_acc", "val_loss", "val_acc")}
    expected["test_acc"] = tests
    for key, values in expected.items():
        assert rows[0][key]["mean"] == pytest.approx(statistics.mean(values))
        assert rows[0][key]["std"] == pytest.approx(statistics.stdev(values))

    markdown = out.read_text()
    val_acc = expected["val_acc"]
    assert f"{statistics.mean(val_acc):.2f} ± {statistics.stdev(val_acc):.2f}" in markdown
    assert "1,234,567" in markdown
    assert markdown in capsys.readouterr().out
    assert "Synthetic data" not in markdown
    assert len([line for line in markdown.splitlines() if line.startswith("| VGG08")]) == 2


def test_report_synthetic_note_and_missing_test(tmp_path: Path) -> None:
    run = make_run(tmp_path, "syn", dataset="synthetic", test_acc=None)
    result = report.build_report([run])
    assert "**Synthetic data**" in result.markdown and "not CIFAR-100" in result.markdown
    row_line = next(line for line in result.markdown.splitlines() if line.startswith("| VGG08"))
    assert row_line.rstrip(" |").endswith("n/a")
    assert result.rows[0]["test_acc"]["values"] == []


def test_report_needs_no_gradflow(tmp_path: Path) -> None:
    run = make_run(tmp_path, "run")
    (run / "gradflow.json").unlink()
    assert report.build_report([run]).rows[0]["seeds"] == 1


def break_config(run: Path) -> str:
    (run / "config.json").write_text("{not json")
    return "config.json"


def break_metrics(run: Path) -> str:
    (run / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 1.0\n')
    return "metrics.jsonl"


def break_gradflow(run: Path) -> str:
    (run / "gradflow.json").write_text("[1, 2")
    return "gradflow.json"


def drop_metrics(run: Path) -> str:
    (run / "metrics.jsonl").unlink()
    return "metrics.jsonl"


def drop_gradflow(run: Path) -> str:
    (run / "gradflow.json").unlink()
    return "gradflow.json"


@pytest.mark.parametrize("damage", [break_config, break_metrics, break_gradflow, drop_metrics, drop_gradflow])
def test_plot_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], damage) -> None:
    run = make_run(tmp_path, "run")
    filename = damage(run)
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(run)])
    assert exit_info.value.code == 2
    assert str(run / filename) in capsys.readouterr().err


@pytest.mark.parametrize("damage", [break_config, break_metrics, drop_metrics])
def test_report_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], damage) -> None:
    run = make_run(tmp_path, "run")
    filename = damage(run)
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(run), "--out", str(tmp_path / "report.md")])
    assert exit_info.value.code == 2
    assert str(run / filename) in capsys.readouterr().err


@pytest.mark.parametrize("main", [plot.main, report.main])
def test_missing_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str], main) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(SystemExit) as exit_info:
        main([str(missing)])
    assert exit_info.value.code == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize("main, out", [(plot.main, "a-file/compare"), (report.main, "a-file/report.md"),
                                       (plot.main, "a-file")])
def test_an_unwritable_out_is_refused_before_reading_the_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              main, out) -> None:
    runs = [make_run(tmp_path, "run0"), make_run(tmp_path, "run1")]
    (tmp_path / "a-file").write_text("in the way\n")
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, runs), "--out", str(tmp_path / out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--out: " in err and "choose another --out" in err and str(tmp_path / "a-file") in err
    assert (tmp_path / "a-file").read_text() == "in the way\n"
