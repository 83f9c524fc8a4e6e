"""Integration: the shipped `tiny` study end to end (build included), as a user runs it."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from lorafuse.cli import app


def test_tiny_study_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the preset builds into runs/tiny under the current folder
    result = CliRunner().invoke(app, ["study", "--preset", "tiny", "--out", "runs/study"])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "runs/study/results.json").read_text())
    assert results["format"] == "lorafuse-study/1"
    names = {(m["name"], m["experts"]) for m in results["methods"]}
    assert ("oracle", "mbc") in names and ("route-arrow-hc", "private") in names
    for m in results["methods"]:
        assert m["status"] == "ok", (m["name"], m.get("error"))
        assert math.isfinite(m["mean"]) and math.isfinite(m["se"])
        assert all(math.isfinite(v) for v in m["per_task"].values())
        assert {"passes", "added_flops_per_token", "relative_flops"} <= set(m["cost"])
    learned = [m for m in results["methods"] if (m.get("fit") or {}).get("stop")]
    assert {m["name"] for m in learned} >= {"ensemble-sgd", "ensemble-distill", "route-sgd"}
    for m in learned:  # every SGD fit says how it ended
        fit = m["fit"]
        assert fit["converged"] is (fit["stop"] == "plateau"), m["name"]
        assert fit["steps"] >= 1 and math.isfinite(fit["final_validation_loss"])
    assert {c["verdict"] for c in results.get("claims", [])} <= {
        "holds", "does not hold", "inconclusive", "inconclusive (not converged)", "not measured",
    }  # fmt: skip
    report = (tmp_path / "runs/study/report.md").read_text()
    assert "ensemble-uniform" in report and "route-sgd" in report and "converged" in report
    assert (tmp_path / "runs/study/report.html").is_file()
