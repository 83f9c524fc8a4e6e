"""The report's headline: what won on this library, and what is nearly as good for less.

Three lines, decided on the study's (first seed's) results:
1. the best task-agnostic method: the lowest test loss among the fusion methods
   (families ensembling, merging, routing, any experts kind; the baselines, the oracle
   among them, are left out: the oracle needs each example's task), with its loss +- se
   and its cost (forward passes, FLOPs per token relative to the base model);
2. the cheapest of those methods (by relative FLOPs, then passes, then loss) whose loss is
   within 2 standard errors of the best's: loss - best's loss <= 2 se of the paired
   per-task difference (over their common tasks), or of the best's own se when fewer
   than two tasks are common; the line says which;
3. the baselines, for context.
A method's family is read from its record (the method table declares it), never from
its name.
"""

from __future__ import annotations

import math
from typing import Any

from lorafuse.study.claims import paired, study_kinds, usable
from lorafuse.study.figures import method_label

FUSION = ("ensembling", "merging", "routing")


def best_and_cheapest(results: dict) -> tuple[dict | None, dict | None, dict[str, Any]]:
    """(best, cheapest within 2 se, how) among the task-agnostic fusion methods.

    `how` is {"rule": "paired" | "best se", "diff", "se", "n_tasks"} for the cheapest (the
    difference cheapest - best and the se it was compared with). (None, None, {}) when no
    fusion method completed.
    """
    pool = [m for m in results.get("methods") or [] if m.get("family") in FUSION and _ok(m)]
    if not pool:
        return None, None, {}
    best = min(pool, key=lambda m: (m["mean"], _cost_key(m)))
    near = []
    for m in pool:
        how = _margin(m, best)
        if m is best or (how["se"] is not None and how["diff"] <= 2 * how["se"]):
            near.append((m, how))
    cheapest, how = min(near, key=lambda x: (*_cost_key(x[0]), x[0]["mean"]))
    return best, cheapest, how


def headline(results: dict) -> list[str]:
    """The three headline lines (module docstring); one line when no fusion method ran."""
    best, cheapest, how = best_and_cheapest(results)
    main = study_kinds(results)[0]
    if best is None:
        return ["No task-agnostic fusion method (ensembling, merging, routing) completed."]
    seeds = results.get("seeds") or {}
    on = f" (seed {next(iter(seeds))} of {len(seeds)} seeds)" if len(seeds) > 1 else ""
    lines = [
        f"Best task-agnostic method{on}: {method_label(best, main)} ({best['family']}), "
        f"test loss {_loss(best)}, {_cost(best)}."
    ]
    if cheapest is best:
        lines.append(
            "Cheapest within 2 se of it: the best itself (no task-agnostic method whose "
            "loss is within 2 se of the best's costs less)."
        )
    else:
        rule = (
            f"paired per-task difference over {how['n_tasks']} tasks"
            if how["rule"] == "paired"
            else "compared with the best's se (fewer than two common tasks)"
        )
        lines.append(
            f"Cheapest within 2 se of it: {method_label(cheapest, main)} "
            f"({cheapest['family']}), test loss {_loss(cheapest)}, {_cost(cheapest)}; "
            f"{how['diff']:+.4f} ± {how['se']:.4f} vs the best ({rule})."
        )
    lines.append(_context(results, main))
    return lines


def _context(results: dict, main: str) -> str:
    base = [m for m in results.get("methods") or [] if m.get("family") == "baseline" and _ok(m)]
    base = [m for m in base if (m.get("experts") or "private") == main]
    if not base:
        return "No baseline completed, for context."
    parts = [f"{m['name']} {_loss(m)}" for m in sorted(base, key=lambda m: m["mean"])]
    return "Baselines, for context (not task-agnostic fusion): " + ", ".join(parts) + "."


def _ok(m: dict) -> bool:
    return usable(m) and m.get("mean") is not None and math.isfinite(m["mean"])


def _margin(m: dict, best: dict) -> dict[str, Any]:
    """m - best and the se it is judged with: paired when two or more tasks are common."""
    s = paired(m, best)
    if s["se"] is not None:
        return {"rule": "paired", **s}
    return {"rule": "best se", "diff": m["mean"] - best["mean"], "se": best.get("se"),
            "n_tasks": s["n_tasks"]}  # fmt: skip


def _cost_key(m: dict) -> tuple[float, float]:
    cost = m.get("cost") or {}
    rel, passes = cost.get("relative_flops"), cost.get("passes")
    return (math.inf if rel is None else rel, math.inf if passes is None else passes)


def _loss(m: dict) -> str:
    se = m.get("se")
    return f"{m['mean']:.4f}" + ("" if se is None else f" ± {se:.4f}")


def _cost(m: dict) -> str:
    cost = m.get("cost") or {}
    passes, rel = cost.get("passes"), cost.get("relative_flops")
    if passes is None and rel is None:
        return "cost not measured"
    parts = [] if passes is None else [f"{passes} forward pass" + ("" if passes == 1 else "es")]
    parts += [] if rel is None else [f"{rel:.3f}x the base model's FLOPs per token"]
    return ", ".join(parts)
