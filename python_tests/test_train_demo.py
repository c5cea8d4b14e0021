"""The training demo's --quick run: it trains, evaluates, counts FLOPs and writes its outputs."""
import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from dynkernels.models import train_demo  # noqa: E402


def test_quick_run_writes_table_json_and_plot(tmp_path):
    runs = train_demo.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    names = [(r.family, r.name) for r in runs]
    assert ("M-CifarNet", "dense") in names and ("M-CifarNet", "FBS") in names
    assert ("ResNet-18", "dense") in names and ("ResNet-18", "LC-Net") in names
    for r in runs:
        assert 0.0 <= r.accuracy <= 1.0
        assert 0 < r.executed_mflops <= r.dense_mflops * (1 + 1e-9)
        if r.name == "dense":
            assert r.executed_mflops == r.dense_mflops
    fbs = [r for r in runs if r.name == "FBS" and r.setting == "d = 0.25"]
    assert fbs and fbs[0].dense_mflops / fbs[0].executed_mflops > 8  # k/C on both sides of each chained conv
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| ") == len(runs) + 2 and "executed MFLOPs" in table
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == len(runs)
    assert (tmp_path / "accuracy_vs_flops.png").stat().st_size > 1000


def test_bad_arguments():
    with pytest.raises(SystemExit):
        train_demo.main(["--epochs", "0"])
