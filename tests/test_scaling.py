"""The scaling benchmark (vggbench.bench.scaling): a tiny grid end to end, and its input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vggbench.bench import scaling


def test_writes_table_chart_and_json_for_every_configuration(tmp_path: Path) -> None:
    status = scaling.main(["--out", str(tmp_path), "--models", "vgg08,vgg14", "--batch-sizes", "2,3",
                           "--threads", "1,2", "--rounds", "1", "--warmup", "0"])
    assert status == 0
    run = json.loads((tmp_path / "scaling.json").read_text())
    assert {(p["model"], p["batch_size"], p["threads"]) for p in run["points"]} == {
        (m, b, t) for m in ("vgg08", "vgg14") for b in (2, 3) for t in (1, 2)}
    for p in run["points"]:
        assert p["native_ms"] > 0 and p["fused_ms"] > 0 and p["ratio"] == pytest.approx(p["fused_ms"] / p["native_ms"])
    assert run["machine"]["winograd_isa"] in ("avx512", "avx2", "none")
    assert run["machine"]["aten_capability"]
    table = (tmp_path / "scaling.md").read_text()
    assert f"Winograd kernels {run['machine']['winograd_isa']}" in table
    assert table.count("| VGG14 BN+RC |") == 4
    assert (tmp_path / "scaling.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(("args", "message"), [
    (["--models", "vgg09"], "has depth 9; valid depths are 8 + 6k"),
    (["--batch-sizes", "32,0"], "expected comma-separated positive integers, e.g. 32,100,256; got '32,0'"),
    (["--threads", "two"], "expected comma-separated positive integers"),
    (["--rounds", "0"], "expected a positive integer, got '0'"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
])
def test_bad_options_exit_2_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                            message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        scaling.main(["--out", str(tmp_path), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
