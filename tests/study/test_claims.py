"""Claims: paired verdicts against a hand computation on tiny per-task dicts."""

from __future__ import annotations

import math
import statistics

import pytest

from lorafuse.study.claims import about_as_good, beats, claims, paired, stats
from tests.study.test_figures import realistic_results

VERDICTS = {
    "holds",
    "does not hold",
    "inconclusive",
    "inconclusive (not converged)",
    "not measured",
}


def method(name, losses, kind="private", status="ok", fit=None):
    per_task = {f"t{i}": float(x) for i, x in enumerate(losses)}
    mean = statistics.fmean(per_task.values()) if per_task else None
    return {
        "name": name,
        "family": "baseline",
        "experts": kind,
        "status": status,
        "error": None if status == "ok" else "boom",
        "mean": mean,
        "se": 0.01,
        "per_task": per_task if status == "ok" else {},
        "cost": {"passes": 1, "added_flops_per_token": 0.0, "relative_flops": 1.0},
        "seconds": {"fit": None, "eval": 1.0},
        "fit": fit,
    }


def results(*methods, analyses=None):
    return {"methods": list(methods), "analyses": analyses or {}}


def row(rows, text):
    (found,) = [r for r in rows if text in r["claim"]]
    return found


def hand(a, b):
    d = [x - y for x, y in zip(a, b)]
    return statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))


A = [1.0, 2.0, 3.0, 2.5]
B = [1.5, 2.4, 3.7, 2.9]  # A is lower on every task by 0.4-0.7
C = [1.1, 1.9, 3.05, 2.45]  # C - A: +0.1, -0.1, +0.05, -0.05 (noise)


def test_paired_matches_hand_computation():
    s = paired(method("a", A), method("b", B))
    diff, se = hand(A, B)
    assert s["n_tasks"] == 4
    assert s["diff"] == pytest.approx(diff)
    assert s["se"] == pytest.approx(se)


def test_paired_uses_common_tasks_only():
    a, b = method("a", A), method("b", B + [9.0])
    assert paired(a, b)["n_tasks"] == 4
    assert paired(a, b)["diff"] == pytest.approx(hand(A, B)[0])


@pytest.mark.parametrize(
    ("diff", "se", "verdict"),
    [
        (-0.5, 0.1, "holds"),
        (0.5, 0.1, "does not hold"),
        (-0.1, 0.1, "inconclusive"),
        (0.15, 0.1, "inconclusive"),
        (-0.5, None, "inconclusive"),
    ],
)
def test_beats_rule(diff, se, verdict):
    assert beats(diff, se) == verdict


def test_about_as_good_rule():
    assert about_as_good(0.05, 0.03) == "holds"
    assert about_as_good(-0.07, 0.03) == "does not hold"
    assert about_as_good(0.0, None) == "inconclusive"


def test_stats_of_one_task_has_no_se():
    assert stats({"t0": 0.3}) == {"diff": 0.3, "se": None, "n_tasks": 1}


def test_two_method_claim_holds_fails_inconclusive():
    glob = "Global SGD merging"
    ok = row(claims(results(method("merge-sgd-global", A), method("merge-sgd-layer", B))), glob)
    diff, se = hand(A, B)
    assert ok["verdict"] == "holds"
    (c,) = ok["numbers"]["comparisons"]
    assert (c["a"], c["b"]) == ("merge-sgd-global", "merge-sgd-layer")
    assert c["diff"] == pytest.approx(diff) and c["se"] == pytest.approx(se)
    assert f"{diff:+.3f}" in ok["evidence"] and f"{se:.3f}" in ok["evidence"]

    bad = row(claims(results(method("merge-sgd-global", B), method("merge-sgd-layer", A))), glob)
    assert bad["verdict"] == "does not hold"
    unsure = row(claims(results(method("merge-sgd-global", C), method("merge-sgd-layer", A))), glob)
    assert unsure["verdict"] == "inconclusive"


@pytest.mark.parametrize("status", ["missing", "failed", "skipped", "nan"])
def test_missing_or_failed_method_is_not_measured(status):
    other = method("merge-sgd-layer", B)
    if status == "missing":
        res = results(other)
    elif status == "nan":
        res = results(method("merge-sgd-global", [1.0, float("nan"), 3.0, 2.0]), other)
    else:
        res = results(method("merge-sgd-global", A, status=status), other)
    r = row(claims(res), "Global SGD merging")
    assert r["verdict"] == "not measured"
    assert "merge-sgd-global" in r["evidence"]
    assert r["numbers"]["missing"]


def test_about_as_good_claim():
    near = [1.01, 1.99, 3.02, 2.48]  # within noise of A
    r = row(
        claims(results(method("merge-uniform", A), method("merge-uniform-full", near))), "Low-rank"
    )
    assert r["verdict"] == "holds"
    far = [x + 0.3 for x in A]
    far[0] += 0.01  # nonzero se
    r = row(
        claims(results(method("merge-uniform", A), method("merge-uniform-full", far))), "Low-rank"
    )
    assert r["verdict"] == "does not hold"


def test_set_claim_aggregation():
    base, shared = method("base", B), method("shared", B)
    uniform = "Uniform ensembling beats every baseline"
    # arrow-top4 missing: not measured, naming it
    r = row(claims(results(method("ensemble-uniform", A), base, shared)), uniform)
    assert r["verdict"] == "not measured" and "arrow-top4" in r["evidence"]
    # all present, one within noise: inconclusive
    arrow = method("arrow-top4", C)
    r = row(claims(results(method("ensemble-uniform", A), base, shared, arrow)), uniform)
    assert r["verdict"] == "inconclusive"
    # one refuting comparison wins over a missing one
    r = row(claims(results(method("ensemble-uniform", B), method("base", A), shared)), uniform)
    assert r["verdict"] == "does not hold"
    # all hold
    arrow = method("arrow-top4", B)
    r = row(claims(results(method("ensemble-uniform", A), base, shared, arrow)), uniform)
    assert r["verdict"] == "holds"
    assert len(r["numbers"]["comparisons"]) == 3


def test_open_set_leaves_out_failed_methods_and_says_so():
    res = results(
        method("oracle", [x - 0.5 for x in A]),
        method("merge-uniform", A),
        method("route-sgd", B),
        method("ensemble-sgd", A, status="failed"),
    )
    r = row(claims(res), "The oracle")
    assert r["verdict"] == "holds"
    assert {c["b"] for c in r["numbers"]["comparisons"]} == {"merge-uniform", "route-sgd"}
    assert "ensemble-sgd" in r["evidence"] and r["numbers"]["left_out"]


def test_kinds_route_sgd_over_mbc_and_figure4():
    res = results(
        method("route-sgd", A, kind="mbc"),
        method("route-sgd", B),  # the private one must not be used
        method("route-hc", C),
        method("arrow-top4", A),
        method("arrow-top4", B, kind="mbc"),
    )
    rows = claims(res)
    hc = row(rows, "route-hc")
    assert hc["verdict"] == "inconclusive"  # A vs C is noise
    assert hc["numbers"]["comparisons"][0]["a"] == "route-sgd [mbc]"
    assert row(rows, "Top-4 Arrow")["verdict"] == "holds"


def test_top1_top4_gap_by_hand():
    arrow4, sgd4 = A, A
    arrow1 = [x + 0.3 + 0.01 * i for i, x in enumerate(A)]
    sgd1 = [x + 0.01 * (i % 2) for i, x in enumerate(A)]
    res = results(
        method("arrow-top1", arrow1),
        method("arrow-top4", arrow4),
        method("route-sgd-top1", sgd1),
        method("route-sgd-top4", sgd4),
    )
    r = row(claims(res), "top-1 vs top-4")
    gap_a = [x - y for x, y in zip(arrow1, arrow4)]
    gap_s = [x - y for x, y in zip(sgd1, sgd4)]
    diff, se = hand(gap_s, gap_a)
    assert r["numbers"]["difference"]["diff"] == pytest.approx(diff)
    assert r["numbers"]["difference"]["se"] == pytest.approx(se)
    assert r["numbers"]["arrow_gap"]["diff"] == pytest.approx(statistics.fmean(gap_a))
    assert r["verdict"] == "holds"
    assert row(claims(results(*res["methods"][:3])), "top-1 vs top-4")["verdict"] == "not measured"


def test_minimax_row_reports_nonzero_fraction():
    res = results(
        method("ensemble-uniform", A),
        method("ensemble-minimax", B, fit={"nonzero_fraction": 0.25}),
    )
    r = row(claims(res), "minimax-LP")
    assert r["verdict"] == "holds"
    assert r["numbers"]["nonzero_fraction"] == 0.25
    assert "25%" in r["evidence"]


def test_analysis_rows():
    an = {
        "not_best_on_own_task": {"count": 3, "n_experts": 10, "experts": ["a", "b", "c"]},
        "greedy": {"sizes": [1, 2, 3], "losses": [3, 2, 1], "private_oracle": 1.0,
                   "recovers_at": 6, "n_experts": 10},
    }  # fmt: skip
    rows = claims(results(analyses=an))
    assert row(rows, "not the best expert")["verdict"] == "holds"
    assert "3 of 10" in row(rows, "not the best expert")["evidence"]
    assert row(rows, "greedy subset")["verdict"] == "holds"
    an["greedy"]["recovers_at"] = None
    an["not_best_on_own_task"]["count"] = 0
    rows = claims(results(analyses=an))
    assert row(rows, "greedy subset")["verdict"] == "does not hold"
    assert row(rows, "not the best expert")["verdict"] == "does not hold"


def test_every_claim_row_on_empty_and_realistic_results():
    empty = claims({"methods": []})
    assert len(empty) == 18
    assert {r["verdict"] for r in empty} == {"not measured"}
    full = claims(realistic_results())
    assert [r["claim"] for r in full] == [r["claim"] for r in empty]
    for r in full:
        assert set(r) == {"claim", "paper", "verdict", "evidence", "numbers"}
        assert r["verdict"] in VERDICTS and r["evidence"]
    assert "not measured" not in {r["verdict"] for r in full}
    assert row(full, "The oracle")["verdict"] == "holds"


def test_failed_analyses_are_not_measured():
    an = {"greedy": {"error": "boom"}, "not_best_on_own_task": {"error": "bang"}}
    rows = claims(results(analyses=an))
    assert row(rows, "greedy subset")["verdict"] == "not measured"
    assert "boom" in row(rows, "greedy subset")["evidence"]
    assert "bang" in row(rows, "not the best expert")["evidence"]


def test_kinds_come_from_the_config():
    res = results(
        method("merge-sgd-global", A, kind="mine"),
        method("merge-sgd-layer", B, kind="mine"),
        method("arrow-top4", A, kind="mine"),
        method("arrow-top4", B, kind="clusters"),
    )
    res["config"] = {"experts": "mine", "cluster_experts": "clusters"}
    rows = claims(res)
    assert row(rows, "Global SGD merging")["verdict"] == "holds"
    assert row(rows, "Top-4 Arrow")["verdict"] == "holds"
    assert claims(res, kind="private")[7]["verdict"] == "not measured"


def fit_ended(converged, stop=None, steps=64):
    """A fit payload's ending, as an SGD fit records it."""
    return {"steps": steps, "converged": converged,
            "stop": stop or ("plateau" if converged else "step cap")}  # fmt: skip


@pytest.mark.parametrize("late", ["merge-sgd-global", "merge-sgd-layer"])
@pytest.mark.parametrize(("first", "second"), [(A, B), (B, A)])  # holds / does not hold
def test_a_fit_that_did_not_converge_makes_the_comparison_inconclusive(late, first, second):
    fits = {"merge-sgd-global": fit_ended(True), "merge-sgd-layer": fit_ended(True)}
    fits[late] = fit_ended(False, "step cap", 40)
    glob = "Global SGD merging"
    res = results(
        method("merge-sgd-global", first, fit=fits["merge-sgd-global"]),
        method("merge-sgd-layer", second, fit=fits["merge-sgd-layer"]),
    )
    r = row(claims(res), glob)
    assert r["verdict"] == "inconclusive (not converged)"
    (c,) = r["numbers"]["comparisons"]
    diff, se = hand(first, second)  # the numbers are still those of the comparison
    assert c["diff"] == pytest.approx(diff) and c["se"] == pytest.approx(se)
    assert f"{diff:+.3f}" in r["evidence"]
    assert f"not converged: {late} (step cap after 40 steps)" in r["evidence"]
    assert (
        c["not_converged"] == r["numbers"]["not_converged"] == [f"{late} (step cap after 40 steps)"]
    )
    # Both converged (or no fit at all): the numbers decide again.
    fits[late] = fit_ended(True) if late == "merge-sgd-global" else None
    res["methods"][0]["fit"], res["methods"][1]["fit"] = fits.values()
    expected = "holds" if first is A else "does not hold"
    assert row(claims(res), glob)["verdict"] == expected


def test_a_converged_refutation_beats_an_unconverged_comparison():
    claim = "Every ensembling method of Figure 2"
    late = method("ensemble-sgd", A, fit=fit_ended(False, "epochs", 32))
    # ensemble-uniform (no fit) loses to merge-uniform: the claim fails on that alone.
    r = row(claims(results(method("ensemble-uniform", B), late, method("merge-uniform", C))), claim)
    assert r["verdict"] == "does not hold"
    verdicts = {c["a"]: c["verdict"] for c in r["numbers"]["comparisons"]}
    assert verdicts == {"ensemble-uniform": "does not hold",
                        "ensemble-sgd": "inconclusive (not converged)"}  # fmt: skip
    assert "ensemble-sgd (epochs after 32 steps)" in r["evidence"]
    # ensemble-uniform wins: what is left rests on the unconverged fit.
    r = row(claims(results(method("ensemble-uniform", A), late, method("merge-uniform", B))), claim)
    assert r["verdict"] == "inconclusive (not converged)"


def test_an_exact_solve_short_of_its_tolerance_is_not_converged():
    exact = method("ensemble-exact", A, fit={"converged": False, "iterations": 500, "gap": 0.1})
    r = row(claims(results(exact, method("ensemble-uniform", B))), "Learned ensemble weights")
    assert r["verdict"] == "inconclusive (not converged)"
    assert "ensemble-exact (not converged after 500 iterations)" in r["evidence"]


def test_top1_top4_gap_rests_on_the_route_sgd_fit():
    arrow1 = [x + 0.3 + 0.01 * i for i, x in enumerate(A)]
    sgd1 = [x + 0.01 * (i % 2) for i, x in enumerate(A)]
    parent = fit_ended(False)  # the top-k variants carry their parent's fit
    res = results(
        method("arrow-top1", arrow1),
        method("arrow-top4", A),
        method("route-sgd-top1", sgd1, fit=parent),
        method("route-sgd-top4", A, fit=parent),
    )
    r = row(claims(res), "top-1 vs top-4")
    assert r["verdict"] == "inconclusive (not converged)"
    assert "route-sgd-top1 (step cap after 64 steps)" in r["evidence"]
    assert r["numbers"]["difference"]["n_tasks"] == 4
    for m in res["methods"][2:]:
        m["fit"] = fit_ended(True)
    assert row(claims(res), "top-1 vs top-4")["verdict"] == "holds"
