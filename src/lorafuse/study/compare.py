"""Two or more finished studies side by side, claim by claim: does the conclusion depend on
the regime (the design of the library: transfer, interference, replay, ...)?

Each study is a folder written by `lorafuse study` (its results.json). A claim's verdict
in a study is its robust verdict when the study ran several seeds (study/seeds.py), else
its verdict; its numbers are the (first seed's) paired difference that decides it. The
"regime" column says "same verdict" when all studies reach the same verdict, "differs"
when they do not, and "not comparable" when any study did not measure the claim.
Each study is labelled by its name, its build's preset and design (`library.preset`) and
its library's structure statistics (`library.structure` in results.json: the share of
experts not best on their own task, the share greedy selection needs, the private
experts' off-task loss relative to the base model's, and the cluster (mbc) experts' when
measured), '-' where the build did not record them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorafuse.errors import FileFormatError, LorafuseError
from lorafuse.formats.schema import check, read_json
from lorafuse.study.claims import FAILS, HOLDS, MISSING, NOT_CONVERGED, UNSURE
from lorafuse.study.results_file import StudyResultsFile

RESULTS = "results.json"
COMPARE_FORMAT = "lorafuse-compare/2"  # /2: any number of studies, ratios, preset
SAME, DIFFERS, NOT_COMPARABLE = "same verdict", "differs", "not comparable"


def load_study(folder: str | os.PathLike) -> dict[str, Any]:
    """The results of a finished study in `folder`.

    Raises LorafuseError naming the folder and the fix when it is not a folder, has no
    results.json, or holds a results.json that is not a finished study's, and
    FileFormatError naming the file and field when a field compare reads is mistyped.
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
        results = read_json(file, what="study results")
    except FileFormatError as e:
        raise FileFormatError(f"{e}; {again}") from None
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise LorafuseError(f"{file} is not a lorafuse study's results ({FORMAT}); {again}")
    if not isinstance(results.get("claims"), list):
        raise LorafuseError(f"{file} has no claims; {again}")
    try:
        check(results, StudyResultsFile, file, what="study results")
    except FileFormatError as e:
        raise FileFormatError(f"{e}; {again}") from None
    return results


def study_label(results: dict, folder: str | os.PathLike) -> dict[str, Any]:
    """{"name", "folder", "preset", "design", "seeds", "not_best_share", "greedy_share",
    "off_task_ratio", "mbc_off_task_ratio", "best", "cheapest"}; None where results.json
    does not record a value (older studies have no off-task ratios and no preset)."""
    from lorafuse.study.headline import best_and_cheapest

    cfg, lib = results.get("config") or {}, results.get("library") or {}
    structure = lib.get("structure") if isinstance(lib.get("structure"), dict) else {}
    kinds = structure.get("kinds") if isinstance(structure.get("kinds"), dict) else {}
    private = structure.get("off_task_ratio")
    best, cheapest, _ = best_and_cheapest(results)
    return {
        "name": cfg.get("name") or Path(folder).name,
        "folder": str(folder),
        "preset": lib.get("preset"),
        "design": _design(lib.get("preset")),
        "seeds": list(cfg.get("seeds") or [cfg.get("seed", 0)]),
        "not_best_share": structure.get("not_best_share"),
        "greedy_share": structure.get("greedy_share"),
        "off_task_ratio": _ratio(kinds, "private") if private is None else private,
        "mbc_off_task_ratio": _ratio(kinds, "mbc"),
        "best": None if best is None else _method(best),
        "cheapest": None if cheapest is None else _method(cheapest),
    }


def compare(studies: Sequence[dict], folders: Sequence[str] | None = None) -> dict[str, Any]:
    """Claim-by-claim comparison of two or more studies' results (module docstring);
    `folders` label them (default "1", "2", ...).

    Returns {"format", "studies": [label, ...], "rows": [{"claim", "paper", "verdicts":
    [one per study], "seed_verdicts": [{seed: verdict} or None, ...], "numbers": [...],
    "regime"}], "counts": {regime: n}}; claims are matched by their text, in the first
    study's order, then those only later studies have. Raises LorafuseError for fewer than
    two studies or when `folders` does not name each of them.
    """
    studies = list(studies)
    folders = [str(i) for i in range(1, len(studies) + 1)] if folders is None else list(folders)
    _need_two(len(studies), folders)
    if len(folders) != len(studies):
        raise LorafuseError(
            f"{len(studies)} studies but {len(folders)} folders ({', '.join(folders)}); "
            "give one folder per study"
        )
    each = [_verdicts(r) for r in studies]
    claims = list(dict.fromkeys(c for v in each for c in v))  # first appearance, in order
    rows = []
    for claim in claims:
        found = [v.get(claim) for v in each]
        verdicts = [r["verdict"] if r else MISSING for r in found]
        if MISSING in verdicts:
            regime = NOT_COMPARABLE
        else:
            regime = SAME if len(set(verdicts)) == 1 else DIFFERS
        rows.append({
            "claim": claim,
            "paper": next(r for r in found if r)["paper"],
            "verdicts": verdicts,
            "seed_verdicts": [r["seeds"] if r else None for r in found],
            "numbers": [numbers(r["row"]) if r else "-" for r in found],
            "regime": regime,
        })  # fmt: skip
    counts = {k: sum(r["regime"] == k for r in rows) for k in (SAME, DIFFERS, NOT_COMPARABLE)}
    labels = [study_label(r, f) for r, f in zip(studies, folders)]
    return {"format": COMPARE_FORMAT, "studies": labels, "rows": rows, "counts": counts}


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


def write_compare(folders: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict:
    """Compare the studies in `folders` (two or more); write `out/compare.json` and
    `out/compare.md` (each atomically, after all studies were read and compared).

    Returns {"comparison": the dict of `compare`, "compare.json", "compare.md": path}.
    Raises LorafuseError (naming the folder and the fix) when fewer than two folders are
    given, a folder is given twice, or one is not a finished study; nothing is written then.
    """
    from lorafuse.io import write_json, write_text

    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]  # one folder: reported by _need_two below
    names = [str(f) for f in folders]
    _need_two(len(names), names)
    seen: dict[Path, str] = {}
    for name in names:
        key = Path(name).resolve()
        if key in seen:
            raise LorafuseError(
                f"the study folder {name} is given twice (also as {seen[key]}); give each "
                "study once"
            )
        seen[key] = name
    comparison = compare([load_study(f) for f in names], names)
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
    """compare.md: one label row per study, then one row per claim (each study's verdict
    and numbers in its own columns, then the regime)."""
    from lorafuse.study.render import markdown

    studies = comparison["studies"]
    names = [s["name"] for s in studies]
    names = [f"{s['name']} ({s['folder']})" if names.count(s["name"]) > 1 else s["name"]
             for s in studies]  # fmt: skip
    head = ["study", "folder", "preset (design)", "seeds", "experts not best on own task",
            "greedy share", "off-task ratio", "best task-agnostic",
            "cheapest within 2 se"]  # fmt: skip
    labels = [
        [n, s["folder"], _preset(s), ", ".join(map(str, s["seeds"])), _share(s["not_best_share"]),
         _share(s["greedy_share"]), _ratios(s), _best(s["best"]), _best(s["cheapest"])]
        for n, s in zip(names, studies)
    ]  # fmt: skip
    counts = ", ".join(f"{k}: {n}" for k, n in comparison["counts"].items())
    rows = [
        [str(i), r["claim"]]
        + [x for j in range(len(studies)) for x in (_verdict(r, j), r["numbers"][j])]
        + [r["regime"]]
        for i, r in enumerate(comparison["rows"], 1)
    ]
    claims_head = ["#", "claim"] + [x for n in names for x in (n, "numbers")] + ["regime"]
    blocks = [
        ("h1", "Which regime decides the winner: " + " vs ".join(names)),
        ("table", head, labels),
        ("p", "off-task ratio: the private experts' mean loss on the other tasks relative to "
              "the base model's (near 1: experts that forget little), and the cluster (mbc) "
              "experts' when measured; '-': not recorded by the study's build."),
        ("p", "A claim's verdict is its robust verdict over the seeds when a study ran "
              "several, else its verdict; the numbers are the (first seed's) paired "
              "difference that decides it. regime: same verdict (all studies agree), differs, "
              "or not comparable (a study did not measure the claim)."),
        ("p", "Claims: " + counts),
        ("table", claims_head, rows),
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


def _need_two(n: int, folders: Sequence[str]) -> None:
    if n < 2:
        got = f" ({', '.join(folders)})" if folders else ""
        raise LorafuseError(
            f"a comparison needs at least two studies; got {n}{got}; give two or more "
            "finished studies' folders (each a `lorafuse study --out` folder)"
        )


def _design(preset: str | None) -> str | None:
    # The design of a built-in preset (data.synthetic); None for a preset it does not know.
    from lorafuse.data.synthetic import PRESETS

    p = PRESETS.get(preset) if isinstance(preset, str) else None
    return None if p is None else p.design


def _ratio(kinds: dict, kind: str) -> float | None:
    k = kinds.get(kind)
    return k.get("ratio") if isinstance(k, dict) else None


def _verdict(row: dict, i: int) -> str:
    seeds = row["seed_verdicts"][i]
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


def _preset(s: dict) -> str:
    if not s.get("preset"):
        return "-"
    return s["preset"] + (f" ({s['design']})" if s.get("design") else "")


def _ratios(s: dict) -> str:
    private, mbc = s.get("off_task_ratio"), s.get("mbc_off_task_ratio")
    text = "-" if private is None else f"{private:.2f}"
    return text + ("" if mbc is None else f" (mbc {mbc:.2f})")


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _upper(c: dict) -> float:
    return c["diff"] + 2 * (c.get("se") or 0.0)


def _pm(x: float, se: float | None, sign: bool = True, digits: int = 3) -> str:
    text = f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
    return text + ("" if se is None else f" ± {se:.{digits}f}")
