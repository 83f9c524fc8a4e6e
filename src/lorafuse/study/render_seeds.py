"""The report's blocks for a study run with several seeds (render.py draws them)."""

from __future__ import annotations

from lorafuse.study.figures import method_label, ordered
from lorafuse.study.seeds import RULE, seed_runs


def seed_methods_table(results: dict) -> tuple | None:
    """("table", head, rows): each method's test loss +- se on each seed; None for one seed."""
    runs = seed_runs(results)
    if not runs:
        return None
    main = (results.get("config") or {}).get("experts") or "private"
    by_seed = {
        s: {(m["name"], m.get("experts") or "private"): m for m in r.get("methods") or []}
        for s, r in runs.items()
    }
    rows = []
    for m in ordered(results):
        key = (m["name"], m.get("experts") or "private")
        rows.append([method_label(m, main)] + [_loss(by_seed[s].get(key)) for s in runs])
    return ("table", ["method", *(f"seed {s}" for s in runs)], rows)


def seed_claims_blocks(results: dict) -> list[tuple] | None:
    """The claims table with each seed's verdict and the robust one; None for one seed."""
    runs = seed_runs(results)
    rows = results.get("robust_claims")
    if not runs or rows is None:
        return None
    evidence = {r["claim"]: r["evidence"] for r in results.get("claims") or []}
    on_answers = {
        r["claim"]: (r.get("exact_match") or {}).get("verdict", "-")
        for r in results.get("claims") or []
    }
    first = next(iter(runs))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    head = ["#", "claim", "paper", *(f"seed {s}" for s in runs), "robust",
            f"evidence (seed {first})", f"exact match (seed {first})"]  # fmt: skip
    table = [
        [str(i), r["claim"], r.get("paper", ""), *(r["verdicts"].get(s, "-") for s in runs),
         r["verdict"], evidence.get(r["claim"], "-"), on_answers.get(r["claim"], "-")]
        for i, r in enumerate(rows, 1)
    ]  # fmt: skip
    return [
        ("p", RULE),
        ("p", "Robust verdicts: " + ", ".join(f"{v}: {n}" for v, n in counts.items())),
        ("table", head, table),
    ]


def _loss(m: dict | None) -> str:
    if m is None or m.get("status") != "ok" or m.get("mean") is None:
        return "-" if m is None else str(m.get("status") or "-")
    se = m.get("se")
    return f"{m['mean']:.4f}" + ("" if se is None else f" ± {se:.4f}")
