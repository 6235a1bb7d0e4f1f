"""The main job, shrunk: five study configurations, plots, report, and the vanishing signature."""

import json
import math

import torch

from vggbench import ops  # noqa: F401  (loads the extension: torch.ops.vggbench.*)
from vggbench.demo import main


def test_demo_shows_the_signature_and_is_idempotent(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--data-dir", str(tmp_path / "no-cifar"), "--dataset", "synthetic", "--epochs", "1",
            "--synthetic-train-size", "1000", "--synthetic-test-size", "200", "--val-size", "200",
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC DATA" in printed and str(out.resolve()) in printed
    # on the CPU the demo trains channels_last, through the fused op where this CPU has its kernels, and says so
    assert printed.count("memory format: channels_last (--channels-last unset: the faster on the CPU") == 5
    fast = torch.ops.vggbench.winograd_isa() != "none"
    assert printed.count(f"layers: {'fused' if fast else 'native'} (--impl auto: ") == 5
    for name in ("report.md", "report.json", "compare.png", "compare.json", "landscape-compare.png"):
        assert (out / name).stat().st_size > 0
    runs = {d.name: d for d in (out / "runs").iterdir()}
    assert set(runs) == {"vgg08-plain", "vgg38-plain", "vgg38-bn", "vgg38-rc", "vgg38-bn_rc"}
    diagnosis = {}
    for name, run in runs.items():
        assert (run / "gradflow.png").exists() and (run / "curves.png").exists() and (run / "test.json").exists()
        assert (run / "landscape.png").exists()
        assert json.loads((run / "config.json").read_text())["channels_last"] is True
        assert [e["epoch"] for e in json.loads((run / "landscape.json").read_text())["epochs"]] == [1]
        flow = json.loads((run / "gradflow.json").read_text())["epochs"][-1]
        diagnosis[name] = flow["diagnosis"]
    assert diagnosis["vgg38-plain"]["status"] == "vanishing" and diagnosis["vgg38-plain"]["ratio"] < 1e-6
    assert all(diagnosis[n]["status"] == "healthy" for n in ("vgg08-plain", "vgg38-bn", "vgg38-bn_rc"))
    plain = json.loads((runs["vgg38-plain"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(plain["train_loss"] - math.log(100)) < 0.02
    report = (out / "report.md").read_text()
    assert "**Synthetic data**" in report
    assert "β-smoothness" in report.splitlines()[0] and "loss band" in report.splitlines()[0]
    landscape = report.split("## Loss landscape along training")[1]
    assert "**synthetic** stand-in dataset" in landscape and "From smoothest to roughest: " in landscape
    assert all(label in landscape for label in ("VGG08", "VGG38 BN+RC", "VGG38 RC"))

    # running it again keeps the finished runs
    stamps = {name: (run / "test.json").stat().st_mtime_ns for name, run in runs.items()}
    assert main(argv) == 0
    assert "already finished" in capsys.readouterr().out
    assert stamps == {name: (run / "test.json").stat().st_mtime_ns for name, run in runs.items()}
