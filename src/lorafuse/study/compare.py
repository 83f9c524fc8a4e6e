"""Two finished studies side by side, claim by claim: does the conclusion depend on the regime?

Each study is a folder written by `lorafuse study` (its results.json). A claim's verdict
in a study is its robust verdict when the study ran several seeds (study/seeds.py), else
its verdict; its numbers are the (first seed's) paired difference that decides it. The
"regime" column says "same verdict" when both studies reach the same verdict, "differs"
when they do not, and "not comparable" when either study did not measure the claim.
Each study is labelled by its name and its library's structure statistics
(`library.structure` in results.json: the share of experts not best on their own task,
the share greedy selection needs), '-' where the build did not record them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lorafuse.errors import LorafuseError
from lorafuse.study.claims import FAILS, HOLDS, MISSING, NOT_CONVERGED, UNSURE

RESULTS = "results.json"
COMPARE_FORMAT = "lorafuse-compare/1"
SAME, DIFFERS, NOT_COMPARABLE = "same verdict", "differs", "not comparable"


def load_study(folder: str | os.PathLike) -> dict[str, Any]:
    """The results of a finished study in `folder`.

    Raises LorafuseError naming the folder and the fix when it is not a folder, has no
    results.json, or holds a results.json that is not a finished study's.
    """
    from lorafuse.study.runner import FORMAT

    root = Path(folder)
    again = f"run `lorafuse study --out {root}` to finish it"
    if not root.is_dir():
        raise LorafuseError(f"{root} is not a folder; give a study's --out folder")
    file = root / RESULTS
    if not file.is_file():
        raise LorafuseError(f"{root} is not a finished study: it has no {RESULTS}; {again}")
    try:
        results = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LorafuseError(f"{file} is not valid JSON ({e}); {again}") from None
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise LorafuseError(f"{file} is not a lorafuse study's results ({FORMAT}); {again}")
    if not isinstance(results.get("claims"), list):
        raise LorafuseError(f"{file} has no claims; {again}")
    return results


def study_label(results: dict, folder: str | os.PathLike) -> dict[str, Any]:
    """{"name", "folder", "seeds", "not_best_share", "greedy_share", "best", "cheapest"}."""
    from lorafuse.study.headline import best_and_cheapest

    cfg, lib = results.get("config") or {}, results.get("library") or {}
    structure = lib.get("structure") if isinstance(lib.get("structure"), dict) else {}
    best, cheapest, _ = best_and_cheapest(results)
    return {
        "name": cfg.get("name") or Path(folder).name,
        "folder": str(folder),
        "seeds": list(cfg.get("seeds") or [cfg.get("seed", 0)]),
        "not_best_share": structure.get("not_best_share"),
        "greedy_share": structure.get("greedy_share"),
        "best": None if best is None else _method(best),
        "cheapest": None if cheapest is None else _method(cheapest),
    }


def compare(a: dict, b: dict, folders: tuple[str, str] = ("a", "b")) -> dict[str, Any]:
    """Claim-by-claim comparison of two studies' results (module docstring).

    Returns {"format", "studies": [label_a, label_b], "rows": [{"claim", "paper",
    "verdicts": [a, b], "seed_verdicts": [{seed: verdict} or None, ...], "numbers": [a, b],
    "regime"}], "counts": {regime: n}}; claims are
    matched by their text, in a's order, then those only b has.
    """
    va, vb = _verdicts(a), _verdicts(b)
    rows = []
    for claim in list(va) + [c for c in vb if c not in va]:
        ra, rb = va.get(claim), vb.get(claim)
        verdicts = [r["verdict"] if r else MISSING for r in (ra, rb)]
        if MISSING in verdicts:
            regime = NOT_COMPARABLE
        else:
            regime = SAME if verdicts[0] == verdicts[1] else DIFFERS
        rows.append({
            "claim": claim,
            "paper": (ra or rb)["paper"],
            "verdicts": verdicts,
            "seed_verdicts": [r["seeds"] if r else None for r in (ra, rb)],
            "numbers": [numbers(r["row"]) if r else "-" for r in (ra, rb)],
            "regime": regime,
        })  # fmt: skip
    counts = {k: sum(r["regime"] == k for r in rows) for k in (SAME, DIFFERS, NOT_COMPARABLE)}
    studies = [study_label(a, folders[0]), study_label(b, folders[1])]
    return {"format": COMPARE_FORMAT, "studies": studies, "rows": rows, "counts": counts}


def numbers(row: dict) -> str:
    """The numbers that decide a claim row: 'A - B = diff ± se' of its deciding comparison
    (with how many of its comparisons hold), else its evidence text."""
    nums = row.get("numbers") or {}
    comps = [c for c in nums.get("comparisons") or [] if c.get("diff") is not None]
    if comps:
        order = {FAILS: 0, UNSURE: 1, NOT_CONVERGED: 1, HOLDS: 2}
        c = min(comps, key=lambda c: (order.get(c["verdict"], 3), -_upper(c)))
        text = f"{c['a']} - {c['b']} = {_pm(c['diff'], c.get('se'))}"
        if len(comps) > 1:
            held = sum(x["verdict"] == HOLDS for x in comps)
            text += f" ({held}/{len(comps)} comparisons hold)"
        return text
    diff = nums.get("difference")
    if isinstance(diff, dict) and diff.get("diff") is not None:
        return f"difference {_pm(diff['diff'], diff.get('se'))}"
    if row.get("verdict") == MISSING:
        return "-"
    return str(row.get("evidence") or "-")


def write_compare(a: str | os.PathLike, b: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Compare the studies in folders `a` and `b`; write `out/compare.json` and
    `out/compare.md` (each atomically, after both studies were read and compared).

    Returns {"comparison": the dict of `compare`, "compare.json", "compare.md": path}.
    Raises LorafuseError (naming the folder) when either is not a finished study.
    """
    from lorafuse.io import write_json, write_text

    ra, rb = load_study(a), load_study(b)
    comparison = compare(ra, rb, (str(a), str(b)))
    text = compare_markdown(comparison)
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise LorafuseError(f"--out {root} is a file; give a folder")
    return {
        "comparison": comparison,
        "compare.json": write_json(root / "compare.json", comparison),
        "compare.md": write_text(root / "compare.md", text),
    }


def compare_markdown(comparison: dict) -> str:
    """compare.md: the two studies' labels, then one row per claim."""
    from lorafuse.study.render import markdown

    sa, sb = comparison["studies"]
    names = [sa["name"], sb["name"]]
    if names[0] == names[1]:
        names = [f"{sa['name']} ({sa['folder']})", f"{sb['name']} ({sb['folder']})"]
    head = ["study", "folder", "seeds", "experts not best on own task", "greedy share",
            "best task-agnostic", "cheapest within 2 se"]  # fmt: skip
    studies = [
        [n, s["folder"], ", ".join(map(str, s["seeds"])), _share(s["not_best_share"]),
         _share(s["greedy_share"]), _best(s["best"]), _best(s["cheapest"])]
        for n, s in zip(names, (sa, sb))
    ]  # fmt: skip
    counts = ", ".join(f"{k}: {n}" for k, n in comparison["counts"].items())
    rows = [
        [str(i), r["claim"], _verdict(r, 0), r["numbers"][0], _verdict(r, 1), r["numbers"][1],
         r["regime"]]
        for i, r in enumerate(comparison["rows"], 1)
    ]  # fmt: skip
    blocks = [
        ("h1", f"Which regime decides the winner: {names[0]} vs {names[1]}"),
        ("table", head, studies),
        ("p", "A claim's verdict is its robust verdict over the seeds when a study ran "
              "several, else its verdict; the numbers are the (first seed's) paired "
              "difference that decides it. regime: same verdict, differs, or not comparable "
              "(a study did not measure the claim)."),  # fmt: skip
        ("p", "Claims: " + counts),
        ("table", ["#", "claim", f"{names[0]}", "numbers", f"{names[1]}", "numbers", "regime"],
         rows),
    ]  # fmt: skip
    return markdown(blocks)


def _verdicts(results: dict) -> dict[str, dict[str, Any]]:
    """claim -> {"verdict" (robust over seeds when there are several), "paper", "row",
    "seeds" ({seed: verdict} of a multi-seed study, else None)}."""
    rows = {r["claim"]: r for r in results.get("claims") or []}
    robust = {r["claim"]: r for r in results.get("robust_claims") or []}
    out = {}
    for claim, r in rows.items():
        verdict = robust[claim]["verdict"] if claim in robust else r["verdict"]
        seeds = robust[claim]["verdicts"] if claim in robust else None
        out[claim] = {"verdict": verdict, "paper": r.get("paper", ""), "row": r, "seeds": seeds}
    return out


def _verdict(row: dict, i: int) -> str:
    seeds = (row.get("seed_verdicts") or [None, None])[i]
    if not seeds:
        return row["verdicts"][i]
    each = ", ".join(f"{s}: {v}" for s, v in seeds.items())
    return f"{row['verdicts'][i]} (robust; seeds {each})"


def _method(m: dict) -> dict[str, Any]:
    return {"name": m["name"], "experts": m.get("experts"), "mean": m.get("mean"),
            "se": m.get("se"), "cost": m.get("cost")}  # fmt: skip


def _best(m: dict | None) -> str:
    if m is None:
        return "-"
    rel = (m.get("cost") or {}).get("relative_flops")
    cost = "" if rel is None else f", {rel:.3f}x FLOPs"
    loss = _pm(m["mean"], m.get("se"), sign=False, digits=4)
    return f"{m['name']} [{m.get('experts') or 'private'}] {loss}{cost}"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _upper(c: dict) -> float:
    return c["diff"] + 2 * (c.get("se") or 0.0)


def _pm(x: float, se: float | None, sign: bool = True, digits: int = 3) -> str:
    text = f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
    return text + ("" if se is None else f" ± {se:.{digits}f}")
