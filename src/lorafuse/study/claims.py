"""The paper's claims, decided on a study's results (anchors.md section 1).

Each claim is one or more paired comparisons of methods (or a number from the analyses),
decided by the rules of lorafuse.study.verdicts (RULE). Methods are identified by
(name, experts kind); claims use the study's experts kind (config "experts", "private"
by default) unless the claim names the cluster kind (config "cluster_experts", "mbc" by
default): routing over MBC experts and Figure 4.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lorafuse.study.verdicts import (  # noqa: F401  (re-exported: the claims' vocabulary)
    APPENDIX_ENSEMBLES,
    BASELINES,
    FAILS,
    HOLDS,
    MISSING,
    NOT_CONVERGED,
    RULE,
    UNSURE,
    Key,
    _compare,
    _evidence,
    _fmt,
    _label,
    _why,
    about_as_good,
    beats,
    lookup,
    not_converged,
    paired,
    stats,
    study_kinds,
    usable,
)


def _row(claim: str, paper: str, res: dict[str, Any], op: str = "-", **numbers) -> dict:
    return {
        "claim": claim,
        "paper": paper,
        "verdict": res["verdict"],
        "evidence": _evidence(res, op),
        "numbers": {
            "comparisons": res["comparisons"],
            "missing": res["missing"],
            "not_converged": res["not_converged"],
            **numbers,
        },
    }


def _names(keys: Sequence[Key], prefix, exclude: Sequence[str] = ()) -> list[Key]:
    return [k for k in keys if k[0].startswith(prefix) and not k[0].startswith(tuple(exclude))]


def _mean_se(m: dict | None) -> dict[str, Any]:
    return {"mean": m.get("mean"), "se": m.get("se")} if m else {"mean": None, "se": None}


def claims(results: dict, kind: str | None = None, cluster: str | None = None) -> list[dict]:
    """One row per claim of the paper and per measurable printed number, decided on `results`.

    Each row: {"claim", "paper", "verdict" (holds | does not hold | inconclusive |
    inconclusive (not converged) | not measured), "evidence" (short text with the
    numbers), "numbers" (the comparisons, each {"a", "b", "diff", "se", "n_tasks",
    "verdict"}, what was missing and the fits that did not converge)}. `kind` and
    `cluster` override the study's experts kinds (`study_kinds`). Never raises on missing
    methods or failed analyses.
    """
    kind = kind or study_kinds(results)[0]
    cluster = cluster or study_kinds(results)[1]
    idx = lookup(results)

    def K(name: str, k: str = kind) -> Key:
        return (name, k)

    # Open sets ("every method", "merge-*") hold the methods that ran; the rest are noted.
    ran = [k for k in idx if k[1] == kind and usable(idx[k])]
    broken = [k for k in idx if k[1] == kind and not usable(idx[k])]

    def left_out(*prefixes: str, exclude: Sequence[str] = ()) -> list[str]:
        return [_why(idx, k) for k in _names(broken, prefixes or ("",), exclude)]

    agnostic = [k for k in ran if k[0] != "oracle"]
    ensembles = _names(ran, "ensemble-", APPENDIX_ENSEMBLES)
    merges = _names(ran, "merge-")
    learned = [K(n) for n in ("ensemble-sgd", "ensemble-exact") if K(n) in ran]
    rows = []

    def add(claim, paper, pairs, rule=beats, op="-", left: Sequence[str] = ()):
        row = _row(claim, paper, _compare(idx, pairs, kind, rule), op)
        if left:
            row["evidence"] += "; left out (not ok): " + ", ".join(left)
            row["numbers"]["left_out"] = list(left)
        rows.append(row)

    add(
        "The oracle (task id known) has a lower loss than every other method",
        "Figure 2: oracle is the best approach; routing falls just short of it",
        [(K("oracle"), k) for k in agnostic] or [(K("oracle"), K("<any other method>"))],
        left=left_out(exclude=("oracle",)),
    )
    rivals = [k for k in agnostic if not k[0].startswith("route-sgd")]
    add(
        "SGD routing (route-sgd) beats every other task-agnostic method "
        "(its own top-k and Arrow-initialised variants excluded)",
        "Figure 2: SGD routing is best among non-oracle methods (MBC experts)",
        [(K("route-sgd"), k) for k in rivals] or [(K("route-sgd"), K("<any other method>"))],
        left=left_out(exclude=("oracle", "route-sgd")),
    )
    add(
        "Every ensembling method of Figure 2 (uniform, SGD/exact, distill) beats every "
        "merging method",
        "Figure 2: ensembling outperforms merging",
        [(e, m) for e in ensembles for m in merges]
        or [(K("ensemble-uniform"), K("merge-uniform"))],
        left=left_out("ensemble-", "merge-", exclude=APPENDIX_ENSEMBLES),
    )
    add(
        "Uniform ensembling beats every baseline but the oracle (base, shared, arrow-top4)",
        "Section 3.1: uniform ensembling outperforms all baselines except the oracle",
        [(K("ensemble-uniform"), K(b)) for b in BASELINES],
    )
    add(
        "Learned ensemble weights (ensemble-sgd, ensemble-exact) beat uniform ensembling",
        "Section 3.2.1: SGD-optimised ensembling improves over uniform ensembling",
        [(k, K("ensemble-uniform")) for k in learned]
        or [(K("ensemble-sgd"), K("ensemble-uniform"))],
        left=left_out("ensemble-sgd", "ensemble-exact") if learned else (),
    )
    add(
        "Distillation (ensemble-distill) slightly beats uniform ensembling",
        "Section 3.2.2: distillation is slightly better than uniform averaging, 1 pass",
        [(K("ensemble-distill"), K("ensemble-uniform"))],
    )
    add(
        "Uniform merging is worse than every ensembling method and than the oracle and "
        "arrow-top4 baselines, but better than the shared expert",
        "Section 4.1: uniform merging underperforms all ensembling and most baselines "
        "(oracle, shared, Arrow), except the shared expert",
        [(e, K("merge-uniform")) for e in ensembles]
        + [(K(b), K("merge-uniform")) for b in ("oracle", "arrow-top4")]
        + [(K("merge-uniform"), K("shared"))],
        left=left_out("ensemble-", exclude=APPENDIX_ENSEMBLES),
    )
    add(
        "Global SGD merging beats layer-wise SGD merging",
        "Section 4.3: global merging unexpectedly outperforms layer-dependent merging",
        [(K("merge-sgd-global"), K("merge-sgd-layer"))],
    )
    add(
        "Probability-level ensembling beats logit-level ensembling",
        "B.3 / Figure 5: ensembling probabilities outperforms ensembling logits",
        [(K("ensemble-uniform"), K("ensemble-uniform-logits"))],
    )
    add(
        "Low-rank (A, B) uniform merging is about as good as full-rank uniform merging",
        "B.2 / Figure 5: both perform similarly (full-rank slightly better)",
        [(K("merge-uniform"), K("merge-uniform-full"))],
        rule=about_as_good,
        op="~",
    )
    add(
        "Routing over cluster (MBC) experts (route-sgd) beats HC routing (route-hc)",
        "Section 5.3: HC routing does not match routing with MBC experts",
        [(K("route-sgd", cluster), K("route-hc"))],
    )
    add(
        "Arrow-initialised HC routing (route-arrow-hc) beats every merging method",
        "Section 5.3: Arrow HC improves hierarchical routing, surpassing all merging",
        [(K("route-arrow-hc"), m) for m in merges] or [(K("route-arrow-hc"), K("merge-uniform"))],
        left=left_out("merge-"),
    )
    add(
        "Cluster (MBC) experts beat private experts for oracle, uniform ensembling and merging",
        "Section 5.2 / Figure 4: MBC experts outperform private experts for these three",
        [(K(n, cluster), K(n)) for n in ("oracle", "ensemble-uniform", "merge-uniform")],
    )
    add(
        "Top-4 Arrow is better with private experts than with cluster (MBC) experts",
        "Section 5.2 / Figure 4: top-4 Arrow performs better with private experts",
        [(K("arrow-top4"), K("arrow-top4", cluster))],
    )
    rows.extend(_numbers(idx, results.get("analyses") or {}, kind))
    return rows


def _numbers(idx: dict[Key, dict], analyses: dict, kind: str) -> list[dict]:
    return [
        _minimax_row(idx, kind),
        _gap_row(idx, kind),
        _not_best_row(analyses.get("not_best_on_own_task")),
        _greedy_row(analyses.get("greedy")),
    ]


def _minimax_row(idx: dict[Key, dict], kind: str) -> dict:
    mm, mu = idx.get(("ensemble-minimax", kind)), idx.get(("ensemble-uniform", kind))
    res = _compare(idx, [(("ensemble-uniform", kind), ("ensemble-minimax", kind))], kind)
    frac = ((mm or {}).get("fit") or {}).get("nonzero_fraction")
    row = _row(
        "The minimax-LP ensemble is worse than uniform ensembling; its coefficients are sparse",
        "B.5: LP 1.150 +- 0.003 vs uniform 0.990 +- 0.002; ~30% of LP coefficients nonzero",
        res,
        minimax=_mean_se(mm),
        uniform=_mean_se(mu),
        nonzero_fraction=frac,
    )
    if res["comparisons"]:
        row["evidence"] += (
            f"; minimax {_fmt(mm.get('mean'))} +- {_fmt(mm.get('se'))} vs uniform "
            f"{_fmt(mu.get('mean'))} +- {_fmt(mu.get('se'))}"
        )
    if frac is not None:
        row["evidence"] += f"; nonzero coefficients {100 * frac:.0f}%"
    return row


def _not_best_row(nb: dict | None) -> dict:
    row = {
        "claim": "Some private experts are not the best expert on their own task",
        "paper": "Section 5.1: 58 of 256 private experts (23%) are not best on their task",
        "verdict": MISSING,
        "evidence": "missing: analyses.not_best_on_own_task",
        "numbers": dict(nb or {}),
    }
    if nb is not None and "count" not in nb:
        row["evidence"] = f"analysis failed: {nb.get('error', 'no count in the results')}"
    elif nb is not None:
        n, count = nb["n_experts"], nb["count"]
        row["verdict"] = HOLDS if count > 0 else FAILS
        row["evidence"] = (
            f"{count} of {n} experts ({100 * count / max(n, 1):.0f}%) are not best on own task"
        )
    return row


def _greedy_row(g: dict | None) -> dict:
    row = {
        "claim": "A greedy subset smaller than the library recovers the private-oracle "
        "validation loss",
        "paper": "Section 5.1 / Figure 7: 150 of 256 experts (59%) recover it",
        "verdict": MISSING,
        "evidence": "missing: analyses.greedy",
        "numbers": {},
    }
    if g is not None and "n_experts" not in g:
        row["evidence"] = f"analysis failed: {g.get('error', 'no n_experts in the results')}"
    elif g is not None:
        at, n = g.get("recovers_at"), g["n_experts"]
        row["numbers"] = {
            "recovers_at": at,
            "n_experts": n,
            "private_oracle": g.get("private_oracle"),
        }
        row["verdict"] = HOLDS if at is not None and at < n else FAILS
        if at is None:
            row["evidence"] = f"not recovered with up to {len(g.get('sizes') or [])} experts"
        else:
            row["evidence"] = f"recovered with {at} of {n} experts ({100 * at / max(n, 1):.0f}%)"
        row["evidence"] += f"; private-oracle loss {_fmt(g.get('private_oracle'))}"
    return row


def _gap_row(idx: dict[Key, dict], kind: str) -> dict:
    names = ("arrow-top1", "arrow-top4", "route-sgd-top1", "route-sgd-top4")
    keys = [(n, kind) for n in names]
    bad = [_why(idx, k) for k in keys if not usable(idx.get(k))]
    claim = "SGD routing's top-1 vs top-4 loss gap is smaller than Arrow's"
    paper = "B.4: top-1 minus top-4 loss is 0.303 for Arrow (MBC experts), 0.013 for SGD routing"
    if bad:
        return {
            "claim": claim,
            "paper": paper,
            "verdict": MISSING,
            "evidence": "missing: " + ", ".join(bad),
            "numbers": {"missing": bad},
        }
    a1, a4, s1, s4 = (idx[k]["per_task"] for k in keys)
    tasks = [t for t in a1 if t in a4 and t in s1 and t in s4]
    arrow = stats({t: a1[t] - a4[t] for t in tasks})
    sgd = stats({t: s1[t] - s4[t] for t in tasks})
    both = stats({t: (s1[t] - s4[t]) - (a1[t] - a4[t]) for t in tasks})
    verdict = beats(both["diff"], both["se"]) if tasks else MISSING
    late = [f"{k[0]} ({why})" for k in keys if (why := not_converged(idx[k]))]
    evidence = (
        f"gap Arrow {_fmt(arrow['diff'], True)} +- {_fmt(arrow['se'])}, "
        f"SGD routing {_fmt(sgd['diff'], True)} +- {_fmt(sgd['se'])}; difference "
        f"{_fmt(both['diff'], True)} +- {_fmt(both['se'])} over {len(tasks)} tasks"
    )
    if late and tasks:
        verdict, evidence = NOT_CONVERGED, evidence + "; not converged: " + ", ".join(late)
    return {
        "claim": claim,
        "paper": paper,
        "verdict": verdict,
        "evidence": evidence,
        "numbers": {"arrow_gap": arrow, "sgd_gap": sgd, "difference": both, "not_converged": late},
    }
