"""The paper's claims, decided on a study's results (anchors.md section 1).

Every comparison of two methods A and B is PAIRED over the tasks both were evaluated on:
d_t = loss_A(t) - loss_B(t), diff = mean_t d_t, se = std(d, ddof=1) / sqrt(n_tasks).
- "A beats B" holds if diff + 2 se < 0, does not hold if diff - 2 se > 0, else it is
  inconclusive (fewer than two common tasks is inconclusive too).
- "A is about as good as B" holds if |diff| <= 2 se, else it does not hold.
- A comparison that rests on a method whose fit did not converge (its fit records
  `converged: false`: an SGD run stopped by its step cap or epochs while still
  improving, an exact solve short of its tolerance) is "inconclusive (not converged)"
  whatever its numbers say; they are still shown and the method is named.
- A claim over several comparisons holds if all of them hold; it does not hold if any
  does not hold; otherwise it is "not measured" when a named method is missing, failed,
  skipped or has a non-finite loss, else "inconclusive (not converged)" when a
  comparison rests on such a fit, else inconclusive.
Methods are identified by (name, experts kind); claims use the study's experts kind
(config "experts", "private" by default) unless the claim names the cluster kind (config
"cluster_experts", "mbc" by default): routing over MBC experts and Figure 4.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

RULE = (
    "Paired over common tasks: diff = mean_t(loss_A - loss_B), se = std(diff, ddof=1)/sqrt(n). "
    "'A beats B' holds if diff + 2 se < 0, does not hold if diff - 2 se > 0, else inconclusive; "
    "'about as good' holds if |diff| <= 2 se. A claim over several comparisons holds if all "
    "hold and does not hold if any does not hold. A comparison resting on a fit that did not "
    "converge (stopped by its step cap or epochs while still improving) is 'inconclusive "
    "(not converged)'."
)
BASELINES = ("base", "shared", "arrow-top4")
# Appendix variants that are not among Figure 2's ensembling methods (B.3, B.5).
APPENDIX_ENSEMBLES = ("ensemble-uniform-logits", "ensemble-minimax", "ensemble-sparse")
HOLDS, FAILS, UNSURE, MISSING = "holds", "does not hold", "inconclusive", "not measured"
NOT_CONVERGED = "inconclusive (not converged)"

Key = tuple[str, str]  # (method name, experts kind)


def lookup(results: dict) -> dict[Key, dict]:
    """{(name, experts): method result} of `results["methods"]` (the first one wins)."""
    out: dict[Key, dict] = {}
    for m in results.get("methods") or []:
        out.setdefault((m["name"], m.get("experts") or "private"), m)
    return out


def study_kinds(results: dict) -> tuple[str, str]:
    """(experts kind, cluster experts kind) of the study: config "experts" and
    "cluster_experts", defaulting to ("private", "mbc")."""
    cfg = results.get("config") or {}
    return cfg.get("experts") or "private", cfg.get("cluster_experts") or "mbc"


def usable(m: dict | None) -> bool:
    """True for a method that ran ("ok") and has finite per-task losses."""
    if m is None or m.get("status") != "ok" or not m.get("per_task"):
        return False
    return all(v is not None and math.isfinite(v) for v in m["per_task"].values())


def not_converged(m: dict | None) -> str | None:
    """Why the fit of method result `m` did not converge ("step cap after 64 steps"), or
    None when it converged or has no fit that can converge (fit.converged not false)."""
    fit = (m or {}).get("fit") or {}
    if fit.get("converged") is not False:
        return None
    stop = fit.get("stop") or "not converged"
    if fit.get("steps") is not None:
        return f"{stop} after {fit['steps']} steps"
    if fit.get("iterations") is not None:
        return f"{stop} after {fit['iterations']} iterations"
    return stop


def stats(values: dict[str, float]) -> dict[str, Any]:
    """{"diff": mean, "se": std(ddof=1)/sqrt(n) (None when n < 2), "n_tasks": n}."""
    d = np.array(list(values.values()), dtype=np.float64)  # (n,)
    n = len(d)
    mean = float(d.mean()) if n else None
    se = float(d.std(ddof=1) / math.sqrt(n)) if n >= 2 else None
    return {"diff": mean, "se": se, "n_tasks": n}


def paired(a: dict, b: dict) -> dict[str, Any]:
    """Paired statistics of loss(a) - loss(b) over the tasks both were evaluated on."""
    common = [t for t in a["per_task"] if t in b["per_task"]]
    return stats({t: a["per_task"][t] - b["per_task"][t] for t in common})


def beats(diff: float | None, se: float | None) -> str:
    """The verdict of "A beats B" from the paired diff = A - B and its se."""
    if diff is None or se is None:
        return UNSURE
    if diff + 2 * se < 0:
        return HOLDS
    return FAILS if diff - 2 * se > 0 else UNSURE


def about_as_good(diff: float | None, se: float | None) -> str:
    """The verdict of "A is about as good as B": |diff| <= 2 se."""
    if diff is None or se is None:
        return UNSURE
    return HOLDS if abs(diff) <= 2 * se else FAILS


def _label(key: Key, kind: str) -> str:
    return key[0] if key[1] == kind else f"{key[0]} [{key[1]}]"


def _why(idx: dict[Key, dict], key: Key) -> str:
    m = idx.get(key)
    if m is None:
        return f"{key[0]} [{key[1]}] (not run)"
    if m.get("status") != "ok":
        return f"{key[0]} [{key[1]}] ({m.get('status')})"
    return f"{key[0]} [{key[1]}] (no finite per-task losses)"


def _fmt(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.3f}" if sign else f"{x:.3f}"


def _compare(idx, pairs: Iterable[tuple[Key, Key]], kind: str, rule=beats) -> dict[str, Any]:
    comps, missing, unfit = [], [], []
    for a, b in pairs:
        bad = [_why(idx, k) for k in (a, b) if not usable(idx.get(k))]
        if bad:
            missing.extend(x for x in bad if x not in missing)
            continue
        s = paired(idx[a], idx[b])
        comps.append({"a": _label(a, kind), "b": _label(b, kind), **s})
        comps[-1]["verdict"] = rule(s["diff"], s["se"]) if s["n_tasks"] else MISSING
        if not s["n_tasks"]:
            missing.append(f"{comps[-1]['a']} vs {comps[-1]['b']} (no common tasks)")
        late = [f"{_label(k, kind)} ({why})" for k in (a, b) if (why := not_converged(idx[k]))]
        if late and s["n_tasks"]:
            comps[-1].update(verdict=NOT_CONVERGED, not_converged=late)
            unfit.extend(x for x in late if x not in unfit)
    verdicts = [c["verdict"] for c in comps]
    if FAILS in verdicts:
        verdict = FAILS
    elif missing or not comps:
        verdict = MISSING
    elif NOT_CONVERGED in verdicts:
        verdict = NOT_CONVERGED
    else:
        verdict = UNSURE if UNSURE in verdicts else HOLDS
    return {"verdict": verdict, "comparisons": comps, "missing": missing, "not_converged": unfit}


def _evidence(res: dict[str, Any], op: str = "-") -> str:
    comps, parts = res["comparisons"], []
    if len(comps) == 1:
        c = comps[0]
        parts.append(
            f"{c['a']} {op} {c['b']} = {_fmt(c['diff'], True)} +- {_fmt(c['se'])} "
            f"over {c['n_tasks']} tasks"
        )
    elif comps:
        held = [c for c in comps if c["verdict"] == HOLDS]
        fails = sum(c["verdict"] == FAILS for c in comps)
        parts.append(
            f"{len(held)}/{len(comps)} comparisons hold, {fails} do not, "
            f"{len(comps) - len(held) - fails} inconclusive"
        )
        rest = [c for c in comps if c["verdict"] != HOLDS]
        rest.sort(key=lambda c: (c["verdict"] != FAILS, -(c["diff"] or 0.0)))
        for c in rest[:4]:
            parts.append(
                f"{c['a']} {op} {c['b']} = {_fmt(c['diff'], True)} +- {_fmt(c['se'])} "
                f"({c['verdict']})"
            )
        if held:
            c = max(held, key=lambda c: c["diff"] + 2 * c["se"])
            parts.append(
                f"closest: {c['a']} {op} {c['b']} = {_fmt(c['diff'], True)} +- {_fmt(c['se'])}"
            )
    if res.get("not_converged"):
        parts.append("not converged: " + ", ".join(res["not_converged"]))
    if res["missing"]:
        parts.append("missing: " + ", ".join(res["missing"]))
    return "; ".join(parts)


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
