"""benchmarks/gpu_check.py --smoke: the GPU check's own code, on CPU in seconds."""
import json

from conftest import load_benchmark

from ivpt.methods import METHODS


def load_script():
    return load_benchmark("gpu_check")


def test_smoke_run_writes_every_methods_row(tmp_path):
    report = load_script().main(["--smoke", "--out", str(tmp_path / "check")])
    saved = json.loads((tmp_path / "check.json").read_text())
    assert saved["rows"] == report["rows"]
    rows = {(r["method"], r["compiled"]): r for r in saved["rows"]}
    assert set(rows) == {(m, c) for m in METHODS for c in (False, True)}
    for row in rows.values():
        assert "error" not in row, row
        assert row["train_img_per_s"] > 0 and row["inference_img_per_s"] > 0 and row["train_peak_memory_gib"] is None
    assert set(saved["ivpt_vs_vpt_deep"]) == {"eager", "compiled"}
    table = (tmp_path / "check.md").read_text()
    assert "torch" in table and all(f"| {m} |" in table for m in METHODS)


def test_budget_stops_cleanly_with_what_was_measured(tmp_path):
    report = load_script().main(["--smoke", "--budget", "0", "--methods", "linear", "vpt-deep",
                                 "--out", str(tmp_path / "check")])
    assert report["stopped_early"] and len(report["rows"]) == 1
    assert json.loads((tmp_path / "check.json").read_text())["stopped_early"]
    assert "Stopped at the time budget" in (tmp_path / "check.md").read_text()
