"""Integration: the shipped `tiny` study end to end (build included), as a user runs it."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from lorafuse.cli import app
from lorafuse.methods.registry import BY_NAME, METHODS


def _check_protocol(results: dict) -> None:
    """The paper's protocol, read from results.json: every Figure-2 method mixed the cluster
    experts (HC the private ones), Figure 4 ran over both, and each claim compared exactly
    the (method, kind) pairs its table row selects, which ran."""
    ran = {(m["name"], m["experts"]) for m in results["methods"] if m["status"] == "ok"}
    cluster, private = results["config"]["experts"], results["config"]["private_experts"]
    assert (cluster, private) == ("mbc", "private")
    for m in METHODS:
        if "fig2" in m.paper:
            kind = private if m.study_experts == "private" else cluster
            assert (m.name, kind) in ran, m.name
            if m.name in ("route-hc", "route-arrow-hc"):
                assert (m.name, cluster) not in ran
        if "fig4" in m.paper:
            assert {(m.name, cluster), (m.name, private)} <= ran, m.name
    assert ("route-sgd", private) not in ran  # Figure 2's routing is over the cluster experts
    rows = {r["id"]: r for r in results["claims"]}
    for r in rows.values():
        assert {tuple(k) for k in r["methods"]} <= ran, r["id"]
    fig2 = {(n, BY_NAME[n].study_experts) for n in BY_NAME if "fig2" in BY_NAME[n].paper}
    expected_3 = {(n, cluster) for n, s in fig2 if BY_NAME[n].role in ("ensembling", "merging")}
    assert {tuple(k) for k in rows[3]["methods"]} == expected_3
    assert {tuple(k) for k in rows[11]["methods"]} == {
        ("route-sgd", cluster),
        ("route-hc", private),
    }
    assert {k for _, k in map(tuple, rows[16]["methods"])} == {cluster}  # B.4 over clusters
    assert {k for _, k in map(tuple, rows[2]["methods"])} == {cluster}


def _check_beyond_the_paper(results: dict) -> None:
    """The merges beyond the paper ran, marked, with their fits; their claims are labelled."""
    by = {m["name"]: m for m in results["methods"] if m["experts"] == "mbc"}
    for name in ("merge-ties", "merge-ties-rank:2", "merge-dare-ties", "merge-search"):
        assert by[name]["origin"] == BY_NAME[name.partition(":")[0]].origin, name
    assert "origin" not in by["merge-sgd-global"]
    ties = by["merge-ties"]["fit"]
    assert ties["density"] in (0.2, 0.5) and len(ties["runs"]) == 2
    rank2 = by["merge-ties-rank:2"]["settings"]
    assert rank2["rank"] == 2 and 0 < rank2["energy_min"] <= rank2["energy_mean"] <= 1
    search = by["merge-search"]["fit"]
    assert search["passes"] <= 9 and search["objective"] <= search["start_objective"]
    assert search["converged"] is (search["stop"] != "pass budget")
    rows = {r["id"]: r for r in results["claims"]}
    assert all(rows[i]["beyond"] and rows[i]["paper"].startswith("beyond the paper") for i in
               (20, 21, 22))  # fmt: skip


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
    learned = [m for m in results["methods"] if (m.get("fit") or {}).get("steps") is not None]
    assert {m["name"] for m in learned} >= {"ensemble-sgd", "ensemble-distill", "route-sgd"}
    for m in learned:  # every SGD fit says how it ended
        fit = m["fit"]
        assert fit["converged"] is (fit["stop"] == "plateau"), m["name"]
        assert fit["steps"] >= 1 and math.isfinite(fit["final_validation_loss"])
    assert {c["verdict"] for c in results.get("claims", [])} <= {
        "holds", "does not hold", "inconclusive", "inconclusive (not converged)", "not measured",
    }  # fmt: skip
    _check_protocol(results)
    _check_beyond_the_paper(results)
    for m in results["methods"]:  # every method generated its answers
        assert 0 <= m["answers"]["exact_match"]["mean"] <= 1, m["name"]
    assert {c["exact_match"]["verdict"] for c in results["claims"]} <= {
        "holds", "does not hold", "inconclusive", "inconclusive (not converged)", "n/a",
    }  # fmt: skip
    report = (tmp_path / "runs/study/report.md").read_text()
    assert "ensemble-uniform" in report and "route-sgd" in report and "converged" in report
    assert "verdict (exact match)" in report and "exact match ± se" in report
    assert "merging, beyond the paper (PEFT / mergekit)" in report
    assert (tmp_path / "runs/study/report.html").is_file()
