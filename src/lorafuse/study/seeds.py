"""Verdicts across seeds: one study repeated with several fit seeds, claim by claim.

A multi-seed study fits and evaluates every method once per seed; each seed's claims are
decided on that seed's results (claims.py). The robust verdict of a claim combines them:
- "holds" when it holds on every seed;
- "does not hold" when it holds on no seed (an inconclusive seed, a not-converged one
  included, counts as not holding: the robust rule only credits what each seed supports);
- "mixed" when it holds on some seeds and not on others;
- "not measured" when no seed could measure it (a seed that could not measure it, while
  others could, counts as not holding too).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lorafuse.study.claims import FAILS, HOLDS, MISSING, claims

MIXED = "mixed"
RULE = (
    "Robust verdict: holds if the claim holds on every seed, does not hold if it holds on "
    "none (inconclusive or not measured counts as not holding), mixed otherwise; not "
    "measured if no seed measured it."
)


def robust(verdicts: Iterable[str]) -> str:
    """The robust verdict of one claim from its verdict on each seed (module docstring)."""
    v = list(verdicts)
    if not v or all(x == MISSING for x in v):
        return MISSING
    held = sum(x == HOLDS for x in v)
    if held == len(v):
        return HOLDS
    return FAILS if held == 0 else MIXED


def combine(per_seed: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """One row per claim: {"claim", "paper", "verdicts": {seed: verdict}, "verdict"}.

    `per_seed` maps each seed (as a string, in study order) to its claim rows; claims are
    matched by their text, in the first seed's order. A claim a seed lacks counts as not
    measured there.
    """
    rows: dict[str, dict[str, Any]] = {}
    for rows_of_seed in per_seed.values():
        for r in rows_of_seed:
            rows.setdefault(r["claim"], {"claim": r["claim"], "paper": r.get("paper", "")})
    for row in rows.values():
        verdicts = {}
        for seed, rows_of_seed in per_seed.items():
            found = next((r for r in rows_of_seed if r["claim"] == row["claim"]), None)
            verdicts[seed] = found["verdict"] if found else MISSING
        row["verdicts"] = verdicts
        row["verdict"] = robust(verdicts.values())
    return list(rows.values())


def seed_runs(results: dict) -> dict[str, dict]:
    """{seed: that seed's results} of a multi-seed study, {} for a single-seed one."""
    seeds = results.get("seeds") or {}
    return seeds if len(seeds) > 1 else {}


def seed_view(results: dict, seed: str) -> dict:
    """The results dict as one seed saw it: its methods, and its analyses when it has its own."""
    run = results["seeds"][seed]
    view = {**results, "methods": run.get("methods") or []}
    for key in ("library", "analyses", "figures", "stages"):
        if key in run:
            view[key] = run[key]
    return view


def add_seeds(results: dict[str, Any], runs: dict[int, dict[str, Any]], per_build: bool) -> None:
    """Add results["seeds"] and results["robust_claims"] to a study's (first seed's) results.

    `runs` maps each seed, in study order, to {"methods", "stages"} and, for a seed with a
    library of its own (`per_build`), "library", "analyses", "figures" (paths relative to
    that seed's folder, `seeds/<seed>/` below the study's but for the first). Each seed's
    claims are decided on its methods (and its own analyses, else the first seed's).
    """
    results["seeds"] = {}
    for i, (seed, r) in enumerate(runs.items()):
        entry: dict[str, Any] = {"methods": r["methods"], "stages": r["stages"]}
        if per_build:
            prefix = "" if i == 0 else f"seeds/{seed}/"
            figures = {k: prefix + v for k, v in (r.get("figures") or {}).items()}
            entry.update(library=r["library"], analyses=r["analyses"], figures=figures)
        entry["claims"] = claims({**results, **entry})
        results["seeds"][str(seed)] = entry
    results["robust_claims"] = combine({k: v["claims"] for k, v in results["seeds"].items()})
