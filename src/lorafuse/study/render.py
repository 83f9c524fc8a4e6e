"""The study's report: figures plus report.md and report.html from a results dict.

The report is built once as a list of blocks (headings, paragraphs, tables, images, lists
of plain text) and written twice: as Markdown and as a self-contained HTML page (inline
CSS, images by relative path). All text is escaped on the way out. Files are written to
a temporary name and renamed into place, so a failed render leaves no half-written file.
"""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from typing import Any

from lorafuse.io import write_text
from lorafuse.study.claims import RULE, claims, lookup, paired, study_kinds, usable
from lorafuse.study.figures import (
    cost_text,
    figure2,
    figure2_answers,
    figure4,
    figure5,
    kind_title,
    method_label,
    ordered,
    sparse_curve,
)
from lorafuse.study.headline import headline
from lorafuse.study.labels import family_text
from lorafuse.study.render_seeds import seed_claims_blocks, seed_methods_table

DRAWN = {
    "figure2": (figure2, "Figure 2: test loss ± se of every method with its inference cost."),
    "figure2_answers": (
        figure2_answers,
        "Beside Figure 2: exact match and Rouge-L ± se of every method's greedy answers.",
    ),
    "figure4": (figure4, "Figure 4: private vs cluster (MBC) experts."),
    "figure5": (
        figure5,
        "Figure 5: probability vs logit ensembling; low-rank vs full-rank merging.",
    ),
    "sparse_curve": (sparse_curve, "Sparse ensemble: training objective vs experts kept."),
}
# Captions of the runner's figures, by a word of their key.
CAPTIONS = {
    "connect": "Figure 3: loss along the linear path between two experts vs the per-input oracle.",
    "minimax": "Figure 6: minimax-LP ensemble coefficients (how sparse the LP solution is).",
    "greedy": "Figure 7: greedy task-level expert selection vs the private-oracle loss.",
    "cluster": "Cluster heat map: similarity of the experts, grouped by cluster.",
}
Block = (
    tuple  # ("h1"|"h2"|"p", text) | ("table", head, rows) | ("img", src, caption) | ("ul", items)
)


def render(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Draw the figures into `out_dir/figures/` and write `report.md` and `report.html`.

    Returns {"figure2" | "figure4" | "figure5" | "sparse_curve" (those drawn), "report.md",
    "report.html": path}. Figures whose data is missing are left out; the runner's PNGs
    listed in results["figures"] (relative to `out_dir`) are shown when they exist.
    """
    out = Path(out_dir)
    written: dict[str, Path] = {}
    images: list[tuple[str, str, str]] = []  # (key, src relative to out, caption)
    for key, (draw, caption) in DRAWN.items():
        path = draw(results, out / "figures" / f"{key}.png")
        if path is not None:
            written[key] = path
            images.append((key, path.relative_to(out).as_posix(), caption))
    missing = []
    for key, src in (results.get("figures") or {}).items():
        if not (out / src).is_file():
            missing.append(f"{key}: {src}")
            continue
        caption = next((c for w, c in CAPTIONS.items() if w in key), f"{key}.")
        images.append((key, Path(src).as_posix(), caption))
    blocks = _blocks(results, claims(results), images, missing)
    texts = {"report.md": markdown(blocks), "report.html": _html(blocks, _title(results))}
    for name, text in texts.items():
        written[name] = write_text(out / name, text)
    return written


def _title(results: dict) -> str:
    name = (results.get("config") or {}).get("name")
    return f"lorafuse study: {name}" if name else "lorafuse study"


def _blocks(
    results: dict, rows: list[dict], images: list[tuple[str, str, str]], missing: list[str]
) -> list[Block]:
    img = {key: ("img", src, caption) for key, src, caption in images}
    blocks: list[Block] = [("h1", _title(results)), ("ul", headline(results))]
    blocks += [*_summary(results), ("h2", "Figure 2: every method"), _figure2_table(results)]
    if (per_seed := seed_methods_table(results)) is not None:
        blocks += [("p", "Test loss ± se on each seed (the table above: the first):"), per_seed]
    broken = [m for m in ordered(results) if m.get("status") != "ok"]
    if broken:
        blocks.append(("p", "Methods that did not complete:"))
        main = study_kinds(results)[0]
        blocks.append(("ul", [f"{method_label(m, main)} ({m.get('status')}): "
                              f"{m.get('error') or '-'}" for m in broken]))  # fmt: skip
    blocks += [img.pop(k) for k in ("figure2", "figure2_answers") if k in img]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    verdicts = seed_claims_blocks(results) or [
        ("p", "Verdicts: " + ", ".join(f"{v}: {n}" for v, n in counts.items())),
        ("table", ["#", "claim (what we test)", "the paper's words", "the paper's numbers",
                   "verdict (NLL)", "our numbers (NLL)", "verdict (exact match)",
                   "our numbers (exact-match error)"],
         [[str(r.get("id", i)), r["claim"], r["paper"], r.get("paper_numbers", ""),
           r["verdict"], _evidence_and_why(r), *_on_answers(r)]
          for i, r in enumerate(rows, 1)]),
    ]  # fmt: skip
    blocks += [
        ("h2", "Claims of the paper"),
        ("p", "Decision rule: " + RULE),
        ("p", BEYOND_NOTE),
        ("p", ANSWERS_RULE),
        *verdicts,
        ("h2", "Private vs cluster (MBC) experts"),
        _kinds_table(results),
    ]  # fmt: skip
    blocks += [img.pop("figure4")] if "figure4" in img else []
    rest = sorted(img.values(), key=lambda b: _figure_number(b[2]))
    blocks += [("h2", "More figures"), *rest] if img or missing else []
    blocks += [("p", "Figures listed but not found: " + ", ".join(missing))] if missing else []
    blocks += [("h2", "Analyses"), ("ul", _analyses(results.get("analyses") or {}))]
    blocks += [("h2", "Stage timings"), _stages_table(results.get("stages") or {})]
    return blocks


BEYOND_NOTE = (
    'The rows labelled "beyond the paper" are not claims of the paper: they compare its '
    "merges with the rivals users run from PEFT, mergekit and LoraHub, under the same rules."
)
ANSWERS_RULE = (
    "Each claim is decided twice, side by side: on the test loss (NLL, the paper's measure) "
    "and on the exact match of the greedy answers (ours), where each method's per-task "
    "exact-match error (1 - exact match) takes the place of its loss under the same rules."
)


def _on_answers(r: dict) -> list[str]:
    em = r.get("exact_match")
    if not em:
        return ["not measured", "no answers in these results"]
    return [em["verdict"], _evidence_and_why(em)]


def _evidence_and_why(r: dict) -> str:
    why = r.get("why")
    return f"{r['evidence']} ({why})" if why and why not in r["evidence"] else r["evidence"]


def _figure_number(caption: str) -> int:
    m = re.match(r"Figure (\d+)", caption)
    return int(m.group(1)) if m else 99


def _summary(results: dict) -> list[Block]:
    lib, cfg = results.get("library") or {}, results.get("config") or {}
    experts = lib.get("experts") or {}
    tasks = list(lib.get("tasks") or [])
    methods = results.get("methods") or []
    status = {s: sum(m.get("status") == s for m in methods) for s in ("ok", "failed", "skipped")}
    hidden = ("name", "seed", "seeds", "build_per_seed", "base_model", "methods", "root")
    settings = {k: v for k, v in cfg.items() if k not in hidden and v not in (None, {}, [])}
    rows = [
        ["base model", str(lib.get("base_model") or cfg.get("base_model") or "?")],
        ["experts", ", ".join(f"{k}: {_count(v)}" for k, v in experts.items()) or "none"],
        ["tasks", f"{len(tasks)}" + (f" ({_clip(', '.join(tasks), 160)})" if tasks else "")],
        ["task families", str(len(lib["families"])) if lib.get("families") else "none given"],
        ["structure", _structure(lib.get("structure"))],
        ["training", _training((lib.get("structure") or {}).get("training"))],
        ["study", f"{cfg.get('name', '?')}, seed {cfg.get('seed', '?')}" + _seeds(cfg)],
        ["methods", ", ".join(f"{n} {s}" for s, n in status.items())],
        ["settings", _clip(json.dumps(settings, default=str), 400) if settings else "defaults"],
    ]
    return [("table", ["library", ""], rows)]


def _structure(st: dict | None) -> str:
    # How much the private experts transfer (the build's structure stage), as in the paper.
    if not st or not st.get("experts"):
        return "not measured (a library made outside `lorafuse benchmark build`)"
    k = st.get("greedy_experts")
    greedy = f"{k} of {st['experts']} ({k / st['experts']:.0%})" if k else "not reached"
    kinds = st.get("kinds") or {}
    ratios = ", ".join(
        f"{kind} {k['ratio']:.2f}" for kind, k in kinds.items() if k.get("ratio") is not None
    )
    cap = st.get("max_examples_per_task", "?")
    split = "full validation split" if cap is None else f"validation, {cap} examples per task"
    return (
        f"{st['not_best_on_own_task']} of {st['experts']} private experts "
        f"({st['not_best_on_own_task'] / st['experts']:.0%}) are not the best on their own "
        f'task (paper: "58 out of 256 experts (about 30%)"); greedy selection recovers '
        f'the private oracle with {greedy} (paper: "150 of 256 experts (about 60%)"); '
        f"off-task loss relative to the base model's: {ratios or 'not measured'} (experts "
        f"that forget little: near 1); {split}"
    )


def _training(budget: dict | None) -> str:
    # Each kind's training budget per task (the build's settings), as the issue asks.
    if not budget:
        return "not recorded (a library made outside `lorafuse benchmark build`)"
    parts = [
        f"{kind}: {k['experts']} expert{'s' * (k['experts'] != 1)}, "
        f"{k['examples_per_task']:g} examples per task "
        f"({k['steps']:g} steps each)"
        for kind, k in budget.items()
    ]
    replay = next(iter(budget.values())).get("replay") or 0
    tail = f"; {replay:.0%} of each batch replays pretraining data" if replay else ""
    return "; ".join(parts) + tail


def _seeds(cfg: dict) -> str:
    seeds = cfg.get("seeds") or []
    if len(seeds) < 2:
        return ""
    per_build = ", one build per seed" if cfg.get("build_per_seed") else ""
    return f"; fits on seeds {', '.join(map(str, seeds))}{per_build}"


def _figure2_table(results: dict) -> Block:
    head = ["method", "family", "experts", "test loss ± se", "exact match ± se",
            "Rouge-L ± se", "passes", "relative FLOPs", "steps", "val loss", "converged",
            "fit s", "eval s", "answers s", "status"]  # fmt: skip
    rows = []
    for m in ordered(results):
        cost, secs = m.get("cost") or {}, m.get("seconds") or {}
        rel = cost_text({"cost": {"relative_flops": cost.get("relative_flops")}})
        rel = rel.replace(" FLOPs", "").replace("cost n/a", "-")
        rows.append([
            m["name"], family_text(m), str(m.get("experts") or "private"),
            _loss(m), answer_cell(m, "exact_match"), answer_cell(m, "rouge_l"),
            str(cost.get("passes", "-")), rel, *fit_cells(m.get("fit")),
            _secs(secs.get("fit")), _secs(secs.get("eval")), _secs(secs.get("answers")),
            str(m.get("status", "")),
        ])  # fmt: skip
    return ("table", head, rows)


def answer_cell(m: dict, metric: str) -> str:
    """'0.438 ± 0.070' of a method's generated answers on `metric`; '-' without them, the
    error when their generation failed."""
    ans = m.get("answers") or {}
    if ans.get("status") == "failed":
        return f"failed: {_clip(str(ans.get('error')), 60)}"
    score = ans.get(metric)
    if not isinstance(score, dict) or score.get("mean") is None:
        return "-"
    return f"{score['mean']:.3f} ± {score.get('se') or 0.0:.3f}"


def fit_cells(fit: dict | None) -> list[str]:
    """[steps, best validation loss, converged yes/no] of a method's fit; "-" for what
    the fit does not record (no fit, or one without steps or a convergence test)."""
    fit = fit or {}
    val, converged = fit.get("validation_loss"), fit.get("converged")
    return [
        "-" if fit.get("steps") is None else str(fit["steps"]),
        f"{val:.4f}" if isinstance(val, (int, float)) else "-",
        "-" if converged is None else ("yes" if converged else "no"),
    ]


def _kinds_table(results: dict) -> Block:
    # Figure 4: each method over the private and over the cluster experts, paired.
    idx = lookup(results)
    cluster, private = study_kinds(results)
    if cluster == private:
        return ("p", f"The study's cluster and private experts are both {kind_title(private)}: "
                     "no Figure 4 comparison.")  # fmt: skip
    names = list(dict.fromkeys(n for n, k in idx if k == private and (n, cluster) in idx))
    rows = []
    for name in names:
        a, b = idx[(name, private)], idx[(name, cluster)]
        diff = "n/a"
        if usable(a) and usable(b):
            s = paired(b, a)
            se = "n/a" if s["se"] is None else f"{s['se']:.4f}"
            diff = f"{s['diff']:+.4f} ± {se} ({s['n_tasks']} tasks)"
        rows.append([name, _loss(a), _loss(b), diff])
    if not rows:
        return ("p", f"No method ran with both {kind_title(private)} and {kind_title(cluster)}.")
    head = ["method", kind_title(private), kind_title(cluster), f"{cluster} - {private} (paired)"]
    return ("table", head, rows)


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _count(v: Any) -> str:
    return str(len(v)) if isinstance(v, list) else str(v)


def _analyses(an: dict) -> list[str]:
    items = [
        f"{k}: failed: {v['error']}" for k, v in an.items() if isinstance(v, dict) and "error" in v
    ]
    an = {k: v for k, v in an.items() if not (isinstance(v, dict) and "error" in v)}
    if c := an.get("clusters"):
        ari = "n/a" if c.get("ari") is None else f"{c['ari']:.3f}"
        sizes = ", ".join(str(len(x)) for x in c.get("clusters") or [])
        items.append(f"clusters: k = {c.get('k')}, sizes {sizes}; ARI with task families {ari}")
    if c := an.get("connectivity"):
        items.append(f"connectivity: {len(c.get('curves') or [])} expert pairs interpolated")
    if g := an.get("greedy"):
        items.append(
            f"greedy selection: private-oracle loss {_num(g.get('private_oracle'))}, "
            f"recovered with {g.get('recovers_at')} of {g.get('n_experts')} experts"
        )
    if nb := an.get("not_best_on_own_task"):
        who = _clip(", ".join(nb.get("experts") or []), 200)
        items.append(f"{nb['count']} of {nb['n_experts']} experts not best on own task: {who}")
    return items or ["no analyses in the results"]


def _stages_table(stages: dict[str, Any]) -> Block:
    rows = [[name, _secs(s.get("seconds")), "yes" if s.get("cached") else "no"]
            for name, s in stages.items()]  # fmt: skip
    total = sum(s.get("seconds") or 0.0 for s in stages.values())
    return ("table", ["stage", "seconds", "cached"], rows + [["total", _secs(total), ""]])


def _loss(m: dict) -> str:
    if m.get("status") != "ok" or m.get("mean") is None:
        return "-"
    se = m.get("se")
    return f"{m['mean']:.4f} ± {se:.4f}" if se is not None else f"{m['mean']:.4f}"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _md(text: Any) -> str:
    """One line of Markdown text: tags and entities neutralised, pipes escaped."""
    text = re.sub(r"&(?=#?\w+;)", "&amp;", " ".join(str(text).split()))
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text).replace("|", "\\|")


def markdown(blocks: list[Block]) -> str:
    """Markdown text of report blocks (headings, paragraphs, lists, images, tables)."""
    out = []
    for b in blocks:
        if b[0] in ("h1", "h2"):
            out.append(("# " if b[0] == "h1" else "## ") + _md(b[1]))
        elif b[0] == "p":
            out.append(_md(b[1]))
        elif b[0] == "ul":
            out.append("\n".join(f"- {_md(x)}" for x in b[1]))
        elif b[0] == "img":
            out.append(f"![{_md(b[2])}]({b[1]})\n\n*{_md(b[2])}*")
        else:
            lines = ["| " + " | ".join(map(_md, b[1])) + " |", "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(map(_md, row)) + " |" for row in b[2]]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
td.holds { background: #d9f2d9 !important; } td.fails { background: #f8d7d7 !important; }
td.unsure { background: #fff3cd !important; } td.missing { background: #e7e7e7 !important; }
td.failed, td.skipped { color: #b00020; font-weight: bold; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-style: italic; color: #555; }
"""
CELL_CLASS = {"holds": "holds", "does not hold": "fails", "inconclusive": "unsure",
              "inconclusive (not converged)": "unsure",
              "not measured": "missing", "failed": "failed", "skipped": "skipped",
              "mixed": "unsure"}  # fmt: skip


def _html(blocks: list[Block], title: str) -> str:
    e = html.escape
    body = []
    for b in blocks:
        if b[0] in ("h1", "h2", "p"):
            body.append(f"<{b[0]}>{e(str(b[1]))}</{b[0]}>")
        elif b[0] == "ul":
            body.append("<ul>" + "".join(f"<li>{e(str(x))}</li>" for x in b[1]) + "</ul>")
        elif b[0] == "img":
            body.append(f'<figure><img src="{e(b[1])}" alt="{e(b[2])}">'
                        f"<figcaption>{e(b[2])}</figcaption></figure>")  # fmt: skip
        else:
            head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(_td(str(c)) for c in row) + "</tr>" for row in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(title)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _td(text: str) -> str:
    cls = CELL_CLASS.get(text)
    return f'<td class="{cls}">{html.escape(text)}</td>' if cls else f"<td>{html.escape(text)}</td>"
