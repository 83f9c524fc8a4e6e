"""How a claim is decided: paired comparisons of two methods over tasks, and verdicts.

Every comparison of two methods A and B is PAIRED over the tasks both were evaluated on:
d_t = loss_A(t) - loss_B(t), diff = mean_t d_t, se = std(d, ddof=1) / sqrt(n_tasks).
The rules (each a `Rule`):
- BEATS, "A beats B": holds if diff + 2 se < 0, does not hold if diff - 2 se > 0, else
  inconclusive (fewer than two common tasks is inconclusive too).
- WITHIN, "A is within 2 se of B": holds if |diff| <= 2 se, else does not hold (used for
  "slightly": a student within noise of its teacher).
- NOT_BEATEN, "B does not beat A": holds unless diff - 2 se > 0 (an exception to
  "underperforms": A is not significantly worse than B).
- EQUIVALENT, "A is about as good as B": an equivalence test with margin
  m = EQUIVALENCE_MARGIN x mean loss of B: holds if |diff| + 2 se <= m (the interval lies
  inside the margin), does not hold if |diff| - 2 se > m, else inconclusive. Noise alone
  cannot pass it.
- A comparison that rests on a method whose fit did not converge (its fit records
  `converged: false`: an SGD run stopped by its step cap or epochs while still
  improving, an exact solve short of its tolerance) is "inconclusive (not converged)"
  whatever its numbers say; they are still shown and the method is named.
- A claim over several comparisons (or parts) holds if all of them hold; it does not
  hold if any does not hold; otherwise it is "not measured" when a named method is
  missing, failed, skipped or has a non-finite loss, else "inconclusive (not converged)"
  when a comparison rests on such a fit, else inconclusive.
Methods are identified by (name, experts kind): Figure 2's methods over the study's
`experts` (the cluster experts, as the paper's Sections 3-4), HC and Figure 4's other
side over its `private_experts`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

EQUIVALENCE_MARGIN = 0.05  # "about as good": within 5% of the reference method's loss
RULE = (
    "Paired over common tasks: diff = mean_t(loss_A - loss_B), se = std(diff, ddof=1)/sqrt(n). "
    "'A beats B' holds if diff + 2 se < 0, does not hold if diff - 2 se > 0, else inconclusive; "
    "'within 2 se' holds if |diff| <= 2 se; 'B does not beat A' holds unless diff - 2 se > 0; "
    f"'about as good' (equivalence, margin m = {EQUIVALENCE_MARGIN:.0%} of B's mean loss) "
    "holds if |diff| + 2 se <= m, does not hold if |diff| - 2 se > m. A claim holds if all its "
    "parts hold and does not hold if any does not hold. A comparison resting on a fit that did "
    "not converge (stopped by its step cap or epochs while still improving) is 'inconclusive "
    "(not converged)'."
)
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
    """(Figure 2's kind, Section 5's private kind) of the study: config "experts" and
    "private_experts", each "private" by default."""
    cfg = results.get("config") or {}
    return cfg.get("experts") or "private", cfg.get("private_experts") or "private"


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


def within_2se(diff: float | None, se: float | None) -> str:
    """The verdict of "A is within 2 se of B": |diff| <= 2 se."""
    if diff is None or se is None:
        return UNSURE
    return HOLDS if abs(diff) <= 2 * se else FAILS


def not_beaten(diff: float | None, se: float | None) -> str:
    """The verdict of "B does not beat A" from diff = A - B: holds unless diff - 2 se > 0."""
    if diff is None or se is None:
        return UNSURE
    return FAILS if diff - 2 * se > 0 else HOLDS


def about_as_good(diff: float | None, se: float | None, margin: float | None) -> str:
    """The verdict of "A is about as good as B", an equivalence test with `margin` (in
    loss units): holds if |diff| + 2 se <= margin, does not hold if |diff| - 2 se >
    margin, else inconclusive."""
    if diff is None or se is None or margin is None:
        return UNSURE
    if abs(diff) + 2 * se <= margin:
        return HOLDS
    return FAILS if abs(diff) - 2 * se > margin else UNSURE


@dataclass(frozen=True)
class Rule:
    """How one paired comparison is decided: `name`, the operator shown between the two
    methods (`op`), and `decide(diff, se, scale)` with `scale` the mean loss of B."""

    name: str
    op: str
    decide: Callable[[float | None, float | None, float | None], str]

    def __call__(self, diff, se, scale=None) -> str:
        return self.decide(diff, se, scale)


BEATS = Rule("beats", "-", lambda d, s, _: beats(d, s))
WITHIN = Rule("within 2 se", "-", lambda d, s, _: within_2se(d, s))
NOT_BEATEN = Rule("not beaten", "-", lambda d, s, _: not_beaten(d, s))
EQUIVALENT = Rule(
    "equivalent",
    "~",
    lambda d, s, scale: about_as_good(
        d, s, None if scale is None else EQUIVALENCE_MARGIN * abs(scale)
    ),
)


def combine(verdicts: list[str]) -> str:
    """One verdict from several (comparisons or parts): all hold -> holds; any does not
    hold -> does not hold; else not measured, not converged, inconclusive in that order."""
    if FAILS in verdicts:
        return FAILS
    if MISSING in verdicts or not verdicts:
        return MISSING
    if NOT_CONVERGED in verdicts:
        return NOT_CONVERGED
    return UNSURE if UNSURE in verdicts else HOLDS


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


def _compare(idx, pairs: Iterable[tuple[Key, Key]], kind: str, rule=BEATS) -> dict[str, Any]:
    comps, missing, unfit = [], [], []
    for a, b in pairs:
        bad = [_why(idx, k) for k in (a, b) if not usable(idx.get(k))]
        if bad:
            missing.extend(x for x in bad if x not in missing)
            continue
        s = paired(idx[a], idx[b])
        comps.append({"a": _label(a, kind), "b": _label(b, kind), **s})
        scale = idx[b].get("mean")
        comps[-1]["verdict"] = rule(s["diff"], s["se"], scale) if s["n_tasks"] else MISSING
        if not s["n_tasks"]:
            missing.append(f"{comps[-1]['a']} vs {comps[-1]['b']} (no common tasks)")
        late = [f"{_label(k, kind)} ({why})" for k in (a, b) if (why := not_converged(idx[k]))]
        if late and s["n_tasks"]:
            comps[-1].update(verdict=NOT_CONVERGED, not_converged=late)
            unfit.extend(x for x in late if x not in unfit)
    verdicts = [c["verdict"] for c in comps]
    verdict = combine(verdicts + ([MISSING] if missing else []))
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
