"""Claims: the declarative table's rows decided on hand-made results, against hand-computed
paired statistics; each corrected claim has a case where it must hold and one where it
must not."""

from __future__ import annotations

import math
import statistics

import pytest

from lorafuse.methods.registry import METHODS
from lorafuse.study.claims import (
    TABLE,
    Compare,
    Pick,
    about_as_good,
    beats,
    claims,
    not_beaten,
    paired,
    stats,
    within_2se,
)
from tests.study.helpers import realistic_results

VERDICTS = {
    "holds",
    "does not hold",
    "inconclusive",
    "inconclusive (not converged)",
    "not measured",
}
CLUSTER, PRIVATE = "mbc", "private"


def method(name, losses, kind=CLUSTER, status="ok", fit=None):
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


def results(*methods, analyses=None, experts=CLUSTER, private=PRIVATE):
    return {
        "config": {"experts": experts, "private_experts": private},
        "methods": list(methods),
        "analyses": analyses or {},
    }


def row(rows, claim_id: int):
    (found,) = [r for r in rows if r["id"] == claim_id]
    return found


def hand(a, b):
    d = [x - y for x, y in zip(a, b)]
    return statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))


def shift(losses, by):
    return [x + by for x in losses]


A = [1.0, 2.0, 3.0, 2.5]
B = [1.5, 2.4, 3.7, 2.9]  # A is lower on every task by 0.4-0.7
C = [1.1, 1.9, 3.05, 2.45]  # C - A: +0.1, -0.1, +0.05, -0.05 (noise)


# ---- the rules ---------------------------------------------------------------------------
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


def test_within_not_beaten_and_equivalence_rules():
    assert within_2se(0.05, 0.03) == "holds"
    assert within_2se(-0.07, 0.03) == "does not hold"
    assert not_beaten(0.05, 0.03) == "holds"  # A worse, but within noise: B does not beat A
    assert not_beaten(-0.5, 0.03) == "holds"
    assert not_beaten(0.07, 0.03) == "does not hold"
    # equivalence: the whole 2-se interval inside the margin, or wholly outside it
    assert about_as_good(0.01, 0.01, 0.05) == "holds"
    assert about_as_good(0.02, 0.02, 0.05) == "inconclusive"  # 0.06 > 0.05: noise cannot pass
    assert about_as_good(-0.2, 0.02, 0.05) == "does not hold"
    assert about_as_good(0.0, None, 0.05) == "inconclusive"


def test_stats_of_one_task_has_no_se():
    assert stats({"t0": 0.3}) == {"diff": 0.3, "se": None, "n_tasks": 1}


# ---- the table ---------------------------------------------------------------------------
def test_table_rows_quote_the_paper_verbatim():
    from pathlib import Path

    paper = Path(__file__).resolve().parents[3] / "shared" / "reference" / "paper.txt"
    if not paper.is_file():
        pytest.skip("the shared reference paper is not next to this checkout")
    text = " ".join(paper.read_text().split()).replace("λ_i", "lambda_i").replace("±", "+-")
    text = text.replace("\u2019", "'").replace(" ,", ",").replace(" .", ".").replace("**", "")
    for c in TABLE:
        for piece in c.quote.split(" [...] "):
            assert piece in text, f"claim {c.id}: {piece!r} is not the paper's words"
    assert "58 out of 256 experts (about 30%)" in row(claims({}), 17)["paper_numbers"]
    assert "150 of 256 experts (about 60%)" in row(claims({}), 18)["paper_numbers"]


def test_a_tagged_pick_selects_exactly_the_tagged_methods():
    """Claim 3 compares every fig2 ensembling method with every fig2 merging method, read
    from the METHODS table independently."""
    ens = [m.name for m in METHODS if m.role == "ensembling" and "fig2" in m.paper]
    mer = [m.name for m in METHODS if m.role == "merging" and "fig2" in m.paper]
    assert ens == ["ensemble-uniform", "ensemble-sgd", "ensemble-distill"]
    assert mer == ["merge-uniform", "merge-sgd-global", "merge-sgd-layer"]
    r = row(claims(results()), 3)
    assert sorted(map(tuple, r["methods"])) == sorted((n, CLUSTER) for n in ens + mer)
    kinds = {"cluster": CLUSTER, "private": PRIVATE}
    (part,) = [p for p in TABLE if p.id == 3][0].parts
    assert isinstance(part, Compare)
    assert part.pairs(kinds) == [((e, CLUSTER), (m, CLUSTER)) for e in ens for m in mer]
    # HC mixes the private experts wherever the figure kind is asked for
    assert Pick(names=("route-hc", "route-sgd")).keys(kinds) == [
        ("route-hc", PRIVATE),
        ("route-sgd", CLUSTER),
    ]


def test_figure2_claims_use_no_appendix_or_own_method():
    appendix = {"ensemble-exact", "merge-uniform-full", "ensemble-uniform-logits", "base"}
    for r in claims(results()):
        if r["id"] in (1, 2, 3, 4, 5, 6, 7, 8, 19):
            assert not appendix & {n for n, _ in r["methods"]}, r["id"]
            assert {k for n, k in r["methods"] if not n.startswith("route-")} <= {CLUSTER}


def test_every_claim_row_on_empty_and_realistic_results():
    empty = claims({"methods": []})
    assert [r["id"] for r in empty] == list(range(1, 23))
    assert {r["verdict"] for r in empty} == {"not measured"}
    assert all(r["why"].startswith("not measured") for r in empty)
    full = claims(realistic_results())
    assert [r["claim"] for r in full] == [r["claim"] for r in empty]
    for r in full:
        assert r["verdict"] in VERDICTS and r["evidence"] and r["paper_numbers"]
        assert r["paper"].startswith(r["section"]) and r["quote"] in r["paper"]
    assert "not measured" not in {r["verdict"] for r in full}


# ---- each claim: where it must hold and where it must not -------------------------------
def test_claim_1_oracle_against_every_figure2_method():
    rivals = [m.name for m in METHODS if "fig2" in m.paper and m.name != "oracle"]
    low = [x - 0.5 for x in A]
    ms = [method(n, A, kind=PRIVATE if n.endswith("hc") else CLUSTER) for n in rivals]
    assert row(claims(results(method("oracle", low), *ms)), 1)["verdict"] == "holds"
    r = row(claims(results(method("oracle", B), *ms)), 1)
    assert r["verdict"] == "does not hold"
    assert len(r["numbers"]["comparisons"]) == len(rivals)
    # a Figure-2 method that did not run: not measured, naming it
    r = row(claims(results(method("oracle", low), *ms[1:])), 1)
    assert r["verdict"] == "not measured" and rivals[0] in r["why"]


def _fig2(losses: dict[str, list[float]], default=B) -> list[dict]:
    names = [m.name for m in METHODS if "fig2" in m.paper]
    return [
        method(n, losses.get(n, default), kind=PRIVATE if n.endswith("hc") else CLUSTER)
        for n in names
    ]


def test_claim_2_route_sgd_beats_merging_ensembling_and_baselines_but_the_oracle():
    good = _fig2({"route-sgd": A, "oracle": shift(A, -0.5)})
    r = row(claims(results(*good)), 2)
    assert r["verdict"] == "holds" and [p["verdict"] for p in r["parts"]] == ["holds"] * 2
    assert ["oracle", CLUSTER] not in r["methods"] and ["route-hc", PRIVATE] not in r["methods"]
    bad = _fig2({"route-sgd": A, "oracle": shift(A, -0.5), "ensemble-sgd": shift(A, -0.3)})
    r = row(claims(results(*bad)), 2)
    assert [p["verdict"] for p in r["parts"]] == ["holds", "does not hold"]
    assert r["verdict"] == "does not hold"


def test_claim_3_ensembling_beats_merging_figure2_only():
    ms = [method(n, A) for n in ("ensemble-uniform", "ensemble-sgd", "ensemble-distill")]
    ms += [method(n, B) for n in ("merge-uniform", "merge-sgd-global", "merge-sgd-layer")]
    full_rank = method("merge-uniform-full", shift(A, -0.3))  # B.2: not in Figure 2
    assert row(claims(results(*ms, full_rank)), 3)["verdict"] == "holds"
    ms[-1] = method("merge-sgd-layer", shift(A, -0.3))
    assert row(claims(results(*ms)), 3)["verdict"] == "does not hold"


def test_claim_4_uniform_ensembling_against_shared_and_arrow_not_base():
    ms = [method("ensemble-uniform", A), method("shared", B), method("arrow-top4", B)]
    base = method("base", shift(A, -0.5))  # not one of the paper's baselines
    r = row(claims(results(*ms, base)), 4)
    assert r["verdict"] == "holds"
    assert sorted(n for n, _ in r["methods"]) == ["arrow-top4", "ensemble-uniform", "shared"]
    ms[2] = method("arrow-top4", shift(A, -0.3))
    assert row(claims(results(*ms)), 4)["verdict"] == "does not hold"


def test_claim_5_sgd_ensemble_only():
    exact = method("ensemble-exact", B)  # lorafuse's own: not part of the claim
    ok = results(method("ensemble-sgd", A), method("ensemble-uniform", B), exact)
    assert row(claims(ok), 5)["verdict"] == "holds"
    bad = results(method("ensemble-sgd", B), method("ensemble-uniform", A))
    assert row(claims(bad), 5)["verdict"] == "does not hold"


def test_claim_6_slightly_means_within_2se_of_the_sgd_teacher():
    teacher = method("ensemble-sgd", A)
    student = method("ensemble-distill", C)  # within noise of its teacher
    uniform = method("ensemble-uniform", B)
    r = row(claims(results(teacher, student, uniform)), 6)
    assert [p["verdict"] for p in r["parts"]] == ["holds", "holds"] and r["verdict"] == "holds"
    # the student far better than its teacher: not "slightly"
    r = row(claims(results(method("ensemble-sgd", shift(B, -0.05)), student, uniform)), 6)
    assert [p["verdict"] for p in r["parts"]] == ["holds", "does not hold"]
    assert r["verdict"] == "does not hold"
    assert ["ensemble-exact", CLUSTER] not in r["methods"]


def test_claim_7_shared_is_the_exception_not_a_third_comparison_to_win():
    ens = [method(n, A) for n in ("ensemble-uniform", "ensemble-sgd", "ensemble-distill")]
    base = [method("oracle", A), method("arrow-top4", A)]
    mu = method("merge-uniform", B)
    noise = (-0.05, 0.03, -0.04, 0.02)  # shared a bit better on average, within noise
    better_shared = method("shared", [x + d for x, d in zip(B, noise)])
    r = row(claims(results(*ens, *base, mu, better_shared)), 7)
    assert [p["verdict"] for p in r["parts"]] == ["holds"] * 3 and r["verdict"] == "holds"
    r = row(claims(results(*ens, *base, mu, method("shared", A))), 7)
    assert r["parts"][2]["verdict"] == "does not hold" and r["verdict"] == "does not hold"
    r = row(claims(results(*ens, method("oracle", A), method("arrow-top4", B), mu, better_shared)),
            7)  # fmt: skip
    assert r["parts"][1]["verdict"] != "holds" and r["verdict"] != "holds"


def test_claim_8_two_method_claim_holds_fails_inconclusive():
    ok = row(claims(results(method("merge-sgd-global", A), method("merge-sgd-layer", B))), 8)
    diff, se = hand(A, B)
    assert ok["verdict"] == "holds"
    (c,) = ok["numbers"]["comparisons"]
    assert (c["a"], c["b"]) == ("merge-sgd-global", "merge-sgd-layer")
    assert c["diff"] == pytest.approx(diff) and c["se"] == pytest.approx(se)
    assert f"{diff:+.3f}" in ok["evidence"] and f"{se:.3f}" in ok["evidence"]
    bad = row(claims(results(method("merge-sgd-global", B), method("merge-sgd-layer", A))), 8)
    assert bad["verdict"] == "does not hold"
    unsure = row(claims(results(method("merge-sgd-global", C), method("merge-sgd-layer", A))), 8)
    assert unsure["verdict"] == "inconclusive" and "within 2 se" in unsure["why"]


@pytest.mark.parametrize("status", ["missing", "failed", "skipped", "nan"])
def test_missing_or_failed_method_is_not_measured(status):
    other = method("merge-sgd-layer", B)
    if status == "missing":
        res = results(other)
    elif status == "nan":
        res = results(method("merge-sgd-global", [1.0, float("nan"), 3.0, 2.0]), other)
    else:
        res = results(method("merge-sgd-global", A, status=status), other)
    r = row(claims(res), 8)
    assert r["verdict"] == "not measured"
    assert "merge-sgd-global" in r["evidence"] and "merge-sgd-global" in r["why"]
    assert r["numbers"]["missing"]


def test_claim_10_is_an_equivalence_test_noise_does_not_pass():
    near = [x + 0.005 * (-1) ** i for i, x in enumerate(A)]  # 0.5% apart, tight
    r = row(claims(results(method("merge-uniform", near), method("merge-uniform-full", A))), 10)
    assert r["verdict"] == "holds"
    noisy = [x + d for x, d in zip(A, (0.3, -0.3, 0.25, -0.2))]  # mean 0, se large: unsure
    r = row(claims(results(method("merge-uniform", noisy), method("merge-uniform-full", A))), 10)
    assert r["verdict"] == "inconclusive"
    far = [x + 0.5 + 0.01 * i for i, x in enumerate(A)]  # 20% worse
    r = row(claims(results(method("merge-uniform", far), method("merge-uniform-full", A))), 10)
    assert r["verdict"] == "does not hold"


def test_claims_11_to_14_use_each_kind():
    res = results(
        method("route-sgd", A),  # cluster experts
        method("route-sgd", B, kind=PRIVATE),  # must not be used
        method("route-hc", B, kind=PRIVATE),
        method("route-arrow-hc", shift(B, -0.3), kind=PRIVATE),
        method("arrow-top4", A, kind=PRIVATE),
        method("arrow-top4", B),
        *(method(n, A) for n in ("oracle", "ensemble-uniform", "merge-uniform")),
        *(method(n, B, kind=PRIVATE) for n in ("oracle", "ensemble-uniform", "merge-uniform")),
        *(method(n, shift(B, 0.2)) for n in ("merge-sgd-global", "merge-sgd-layer")),
    )
    rows = claims(res)
    r11 = row(rows, 11)
    assert r11["verdict"] == "holds"
    assert r11["methods"] == [["route-sgd", CLUSTER], ["route-hc", PRIVATE]]
    assert r11["numbers"]["comparisons"][0]["b"] == "route-hc [private]"
    r12 = row(rows, 12)
    assert [p["verdict"] for p in r12["parts"]] == ["holds", "does not hold"]  # merge-uniform A
    r13 = row(rows, 13)
    assert r13["verdict"] == "holds" and len(r13["numbers"]["comparisons"]) == 3
    assert row(rows, 14)["verdict"] == "holds"
    # flipped: private beats cluster for the three, cluster Arrow wins
    for m in res["methods"]:
        if m["name"] in ("oracle", "ensemble-uniform", "merge-uniform", "arrow-top4"):
            m["per_task"] = {t: -v for t, v in m["per_task"].items()}
    rows = claims(res)
    assert row(rows, 13)["verdict"] == "does not hold"
    assert row(rows, 14)["verdict"] == "does not hold"


def test_claim_12_first_half_arrow_hc_improves_hc():
    merges = [method(n, shift(B, 0.3)) for n in ("merge-uniform", "merge-sgd-global",
                                                  "merge-sgd-layer")]  # fmt: skip
    hc = method("route-hc", A, kind=PRIVATE)
    worse = method("route-arrow-hc", B, kind=PRIVATE)  # beats every merge, not HC
    r = row(claims(results(hc, worse, *merges)), 12)
    assert [p["verdict"] for p in r["parts"]] == ["does not hold", "holds"]
    assert r["verdict"] == "does not hold"
    better = method("route-arrow-hc", shift(A, -0.4), kind=PRIVATE)
    assert row(claims(results(hc, better, *merges)), 12)["verdict"] == "holds"


def test_claim_15_both_halves_loss_and_sparsity():
    def res(frac, mm=B):
        fit = {"nonzero_fraction": frac}
        return results(method("ensemble-uniform", A), method("ensemble-minimax", mm, fit=fit))

    r = row(claims(res(0.25)), 15)
    assert r["verdict"] == "holds" and r["numbers"]["nonzero_fraction"] == 0.25
    assert "25%" in r["evidence"]
    r = row(claims(res(0.8)), 15)
    assert [p["verdict"] for p in r["parts"]] == ["holds", "does not hold"]
    assert r["verdict"] == "does not hold"
    assert row(claims(res(0.25, mm=shift(A, -0.5))), 15)["verdict"] == "does not hold"
    assert "1.150 +- 0.003" in r["paper_numbers"]


def test_claim_16_top1_top4_gap_by_hand_over_cluster_experts():
    arrow1 = [x + 0.3 + 0.01 * i for i, x in enumerate(A)]
    sgd1 = [x + 0.01 * (i % 2) for i, x in enumerate(A)]
    ms = [method("arrow-top1", arrow1), method("arrow-top4", A),
          method("route-sgd-top1", sgd1), method("route-sgd-top4", A)]  # fmt: skip
    r = row(claims(results(*ms)), 16)
    gap_a = [x - y for x, y in zip(arrow1, A)]
    gap_s = [x - y for x, y in zip(sgd1, A)]
    diff, se = hand(gap_s, gap_a)
    assert r["numbers"]["difference"]["diff"] == pytest.approx(diff)
    assert r["numbers"]["difference"]["se"] == pytest.approx(se)
    assert r["numbers"]["arrow_gap"]["diff"] == pytest.approx(statistics.fmean(gap_a))
    assert r["verdict"] == "holds"
    assert r["methods"] == [
        [n, CLUSTER] for n in ("arrow-top1", "arrow-top4", "route-sgd-top1", "route-sgd-top4")
    ]
    # the same methods over the private experts do not count
    private = [dict(m, experts=PRIVATE) for m in ms]
    assert row(claims(results(*private)), 16)["verdict"] == "not measured"
    # SGD's gap larger than Arrow's
    ms[0], ms[2] = method("arrow-top1", sgd1), method("route-sgd-top1", arrow1)
    assert row(claims(results(*ms)), 16)["verdict"] == "does not hold"


def test_claims_17_18_from_the_analyses():
    an = {
        "not_best_on_own_task": {"count": 3, "n_experts": 10, "experts": ["a", "b", "c"]},
        "greedy": {"sizes": [1, 2, 3], "losses": [3, 2, 1], "private_oracle": 1.0,
                   "recovers_at": 6, "n_experts": 10},
    }  # fmt: skip
    rows = claims(results(analyses=an))
    assert row(rows, 17)["verdict"] == "holds" and "3 of 10" in row(rows, 17)["evidence"]
    assert row(rows, 18)["verdict"] == "holds" and "6 of 10" in row(rows, 18)["evidence"]
    an["greedy"]["recovers_at"] = None
    an["not_best_on_own_task"]["count"] = 0
    rows = claims(results(analyses=an))
    assert row(rows, 18)["verdict"] == "does not hold"
    assert row(rows, 17)["verdict"] == "does not hold"
    an = {"greedy": {"error": "boom"}, "not_best_on_own_task": {"error": "bang"}}
    rows = claims(results(analyses=an))
    assert row(rows, 18)["verdict"] == "not measured" and "boom" in row(rows, 18)["why"]
    assert "bang" in row(rows, 17)["evidence"]


def test_claim_19_sgd_merging_between_uniform_merging_and_ensembling():
    ens = [method(n, A) for n in ("ensemble-uniform", "ensemble-sgd", "ensemble-distill")]
    sgd = [method(n, B) for n in ("merge-sgd-global", "merge-sgd-layer")]
    mu = method("merge-uniform", shift(B, 0.3))
    assert row(claims(results(*ens, *sgd, mu)), 19)["verdict"] == "holds"
    mu = method("merge-uniform", A)
    r = row(claims(results(*ens, *sgd, mu)), 19)
    assert [p["verdict"] for p in r["parts"]] == ["does not hold", "holds"]


def test_kinds_come_from_the_config():
    res = results(
        method("merge-sgd-global", A, kind="mine"),
        method("merge-sgd-layer", B, kind="mine"),
        method("arrow-top4", B, kind="mine"),
        method("arrow-top4", A, kind="solo"),
        experts="mine",
        private="solo",
    )
    rows = claims(res)
    assert row(rows, 8)["verdict"] == "holds"
    assert row(rows, 14)["verdict"] == "holds"
    res["config"] = {}  # both kinds default to "private": nothing is over "mine"
    assert row(claims(res), 8)["verdict"] == "not measured"
    assert "both 'private'" in row(claims(res), 14)["why"]


# ---- convergence -------------------------------------------------------------------------
def fit_ended(converged, stop=None, steps=64):
    """A fit payload's ending, as an SGD fit records it."""
    return {"steps": steps, "converged": converged,
            "stop": stop or ("plateau" if converged else "step cap")}  # fmt: skip


@pytest.mark.parametrize("late", ["merge-sgd-global", "merge-sgd-layer"])
@pytest.mark.parametrize(("first", "second"), [(A, B), (B, A)])  # holds / does not hold
def test_a_fit_that_did_not_converge_makes_the_comparison_inconclusive(late, first, second):
    fits = {"merge-sgd-global": fit_ended(True), "merge-sgd-layer": fit_ended(True)}
    fits[late] = fit_ended(False, "step cap", 40)
    res = results(
        method("merge-sgd-global", first, fit=fits["merge-sgd-global"]),
        method("merge-sgd-layer", second, fit=fits["merge-sgd-layer"]),
    )
    r = row(claims(res), 8)
    assert r["verdict"] == "inconclusive (not converged)"
    (c,) = r["numbers"]["comparisons"]
    diff, se = hand(first, second)  # the numbers are still those of the comparison
    assert c["diff"] == pytest.approx(diff) and c["se"] == pytest.approx(se)
    assert f"{diff:+.3f}" in r["evidence"]
    assert f"not converged: {late} (step cap after 40 steps)" in r["evidence"]
    assert late in r["why"]
    # Both converged (or no fit at all): the numbers decide again.
    fits[late] = fit_ended(True) if late == "merge-sgd-global" else None
    res["methods"][0]["fit"], res["methods"][1]["fit"] = fits.values()
    expected = "holds" if first is A else "does not hold"
    assert row(claims(res), 8)["verdict"] == expected


def test_a_converged_refutation_beats_an_unconverged_comparison():
    late = method("ensemble-sgd", A, fit=fit_ended(False, "epochs", 32))
    others = [method("ensemble-distill", A)] + [
        method(n, C) for n in ("merge-uniform", "merge-sgd-global", "merge-sgd-layer")
    ]
    # ensemble-uniform (no fit) loses to the merges: the claim fails on that alone.
    r = row(claims(results(method("ensemble-uniform", B), late, *others)), 3)
    assert r["verdict"] == "does not hold"
    verdicts = {c["a"]: c["verdict"] for c in r["numbers"]["comparisons"]}
    assert verdicts["ensemble-uniform"] == "does not hold"
    assert verdicts["ensemble-sgd"] == "inconclusive (not converged)"
    assert "ensemble-sgd (epochs after 32 steps)" in r["evidence"]
    # ensemble-uniform wins: what is left rests on the unconverged fit.
    others = [method("ensemble-distill", shift(B, -1.0))] + [
        method(n, B) for n in ("merge-uniform", "merge-sgd-global", "merge-sgd-layer")
    ]
    r = row(claims(results(method("ensemble-uniform", shift(B, -1.0)), late, *others)), 3)
    assert r["verdict"] == "inconclusive (not converged)"


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
    r = row(claims(res), 16)
    assert r["verdict"] == "inconclusive (not converged)"
    assert "route-sgd-top1 [mbc] (step cap after 64 steps)" in r["evidence"]
    assert r["numbers"]["difference"]["n_tasks"] == 4
    for m in res["methods"][2:]:
        m["fit"] = fit_ended(True)
    assert row(claims(res), 16)["verdict"] == "holds"


def with_answers(m: dict, exact: list[float]) -> dict:
    per_task = {f"t{i}": {"exact_match": x, "rouge_l": x, "n_examples": 4}
                for i, x in enumerate(exact)}  # fmt: skip
    em = {"mean": statistics.fmean(exact), "se": 0.01}
    return {**m, "answers": {"exact_match": em, "rouge_l": em, "per_task": per_task}}


def test_each_claim_is_also_decided_on_exact_match():
    # Claim 8, "global SGD merging beats layer-wise": on the loss global is clearly worse,
    # on exact match clearly better (hand-computed paired differences of 1 - EM below).
    glob = with_answers(method("merge-sgd-global", [1.0, 1.1, 1.2]), [0.9, 0.8, 0.7])
    layer = with_answers(method("merge-sgd-layer", [0.5, 0.6, 0.6]), [0.5, 0.5, 0.3])
    rows = {r["id"]: r for r in claims(results(glob, layer))}
    assert rows[8]["verdict"] == "does not hold"
    em = rows[8]["exact_match"]
    assert em["verdict"] == "holds"
    (comp,) = em["numbers"]["comparisons"]
    d = [(1 - 0.9) - (1 - 0.5), (1 - 0.8) - (1 - 0.5), (1 - 0.7) - (1 - 0.3)]
    assert comp["diff"] == pytest.approx(statistics.fmean(d))
    assert comp["se"] == pytest.approx(statistics.stdev(d) / math.sqrt(3))
    # a method without answers leaves the exact-match side not measured
    rows = {r["id"]: r for r in claims(results(glob, method("merge-sgd-layer", [0.5] * 3)))}
    assert rows[8]["exact_match"]["verdict"] == "not measured"
    assert "no answers" in rows[8]["exact_match"]["why"]
    assert rows[17]["exact_match"]["verdict"] == "n/a"  # a statistic of the loss matrix


# ---- comparisons beyond the paper ---------------------------------------------------------
def test_beyond_the_paper_rows_are_labelled_and_pick_their_methods():
    rows = {r["id"]: r for r in claims(results())}
    assert [i for i, r in rows.items() if r["beyond"]] == [20, 21, 22]
    for i in (20, 21, 22):
        assert rows[i]["paper"].startswith("beyond the paper: ") and rows[i]["quote"] == ""
        assert rows[i]["section"] == "beyond the paper"
    assert rows[20]["methods"] == [["merge-ties", CLUSTER], ["merge-uniform", CLUSTER]]
    assert rows[21]["methods"] == [["merge-dare-ties", CLUSTER], ["merge-uniform", CLUSTER]]
    assert rows[22]["methods"] == [["merge-search", CLUSTER], ["merge-sgd-global", CLUSTER]]
    assert not any(r["beyond"] for i, r in rows.items() if i < 20)


@pytest.mark.parametrize(("claim_id", "name"), [(20, "merge-ties"), (21, "merge-dare-ties")])
def test_sparsifying_merges_against_uniform_merging(claim_id, name):
    uniform = method("merge-uniform", B)
    ok = row(claims(results(method(name, A), uniform)), claim_id)
    diff, se = hand(A, B)
    (c,) = ok["numbers"]["comparisons"]
    assert ok["verdict"] == "holds" and (c["a"], c["b"]) == (name, "merge-uniform")
    assert c["diff"] == pytest.approx(diff) and c["se"] == pytest.approx(se)
    assert (
        row(claims(results(method(name, B), method("merge-uniform", A))), claim_id)["verdict"]
        == "does not hold"
    )
    unsure = row(claims(results(method(name, C), method("merge-uniform", A))), claim_id)
    assert unsure["verdict"] == "inconclusive"
    assert row(claims(results(uniform)), claim_id)["verdict"] == "not measured"


def test_merge_search_not_beaten_by_sgd_merging():
    """merge-search - merge-sgd-global = d +- se over tasks (by hand): holds unless d > 2 se."""
    sgd = method("merge-sgd-global", A)
    for losses, verdict in ((B, "does not hold"), (C, "holds"), (shift(A, -0.3), "holds")):
        r = row(claims(results(method("merge-search", losses), sgd)), 22)
        diff, se = hand(losses, A)
        assert (diff > 2 * se) is (verdict == "does not hold")
        assert r["verdict"] == verdict, losses
        (c,) = r["numbers"]["comparisons"]
        assert c["diff"] == pytest.approx(diff) and c["se"] == pytest.approx(se)
    late = method("merge-search", C, fit={"converged": False, "stop": "pass budget"})
    r = row(claims(results(late, sgd)), 22)
    assert r["verdict"] == "inconclusive (not converged)" and "pass budget" in r["why"]
