"""The study's figures, drawn from a results dict (no model code).

Every function writes one PNG atomically (`lorafuse.io.save_png`, ~150 dpi) and returns
its path, or returns None without writing when the results lack its data. Figures are
built with `matplotlib.figure.Figure` (the Agg canvas), never pyplot, so no display and
no global state is touched.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lorafuse.io import save_png
from lorafuse.study.claims import lookup, paired, study_kinds, usable

FAMILIES = ("baseline", "ensembling", "merging", "routing")
FAMILY_TITLES = dict(zip(FAMILIES, ("baselines", "ensembling", "merging", "routing")))
COLOURS = {
    "baseline": "tab:gray",
    "ensembling": "tab:blue",
    "merging": "tab:orange",
    "routing": "tab:green",
}
KIND_COLOURS = ("tab:purple", "tab:cyan")  # the study's experts kind, its cluster kind
FIG4_METHODS = ("oracle", "ensemble-uniform", "merge-uniform", "arrow-top4")


def ordered(results: dict) -> list[dict]:
    """The methods grouped by family (baselines, ensembling, merging, routing, others),
    each family in results order, the study's experts kind before other kinds."""
    rank = {f: i for i, f in enumerate(FAMILIES)}
    main = study_kinds(results)[0]
    methods = results.get("methods") or []

    def key(i: int) -> tuple:
        m = methods[i]
        return rank.get(m.get("family"), len(FAMILIES)), (m.get("experts") or "private") != main, i

    return [methods[i] for i in sorted(range(len(methods)), key=key)]


def kind_title(kind: str) -> str:
    """'private experts', 'cluster (MBC) experts' or '<kind> experts'."""
    return {"mbc": "cluster (MBC) experts"}.get(kind, f"{kind} experts")


def cost_text(m: dict) -> str:
    """'1 pass, 1.004x FLOPs' from a method's "cost" (relative FLOPs per token)."""
    cost = m.get("cost") or {}
    passes, rel = cost.get("passes"), cost.get("relative_flops")
    parts = []
    if passes is not None:
        parts.append(f"{passes} pass" + ("" if passes == 1 else "es"))
    if rel is not None:
        parts.append(f"{rel:.3f}x FLOPs" if rel < 10 else f"{rel:.1f}x FLOPs")
    return ", ".join(parts) or "cost n/a"


def method_label(m: dict, main: str = "private") -> str:
    """The method's name, with its experts kind when that is not `main`."""
    kind = m.get("experts") or "private"
    return m["name"] if kind == main else f"{m['name']} [{kind}]"


def figure2(results: dict, path: str | os.PathLike) -> Path | None:
    """Figure 2: test loss +- se of every method, grouped and coloured by family.

    Each row shows the mean loss with its se bar and, on the right, the inference cost
    (forward passes, FLOPs per token relative to the base model). Methods that failed or
    were skipped get a row saying so. Returns None when no method has a result.
    """
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory

    methods = ordered(results)
    if not any(m.get("mean") is not None and m.get("status") == "ok" for m in methods):
        return None
    n = len(methods)
    fig = Figure(figsize=(10, 1.6 + 0.3 * n))
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]  # first method on top
    text_at = blended_transform_factory(ax.transAxes, ax.transData)
    done_families: set[str] = set()
    for yi, m in zip(y, methods):
        fam = m.get("family")
        colour = COLOURS.get(fam, "black")
        if m.get("status") == "ok" and m.get("mean") is not None:
            ax.errorbar(
                m["mean"], yi, xerr=m.get("se") or 0.0, fmt="o", color=colour, ms=6, capsize=3,
                label=FAMILY_TITLES.get(fam, fam) if fam not in done_families else None,
            )  # fmt: skip
            done_families.add(fam)
            note = cost_text(m)
        else:
            note, colour = f"{m.get('status', 'missing')}: {_short(m.get('error'))}", "tab:red"
        ax.text(1.02, yi, note, transform=text_at, va="center", fontsize=8, color=colour)
    starts = [i for i in range(1, n) if methods[i].get("family") != methods[i - 1].get("family")]
    for i in starts:
        ax.axhline(y[i] + 0.5, color="0.8", lw=0.8)
    main = study_kinds(results)[0]
    oracle = lookup(results).get(("oracle", main))
    if usable(oracle) and oracle.get("mean") is not None:
        ax.axvline(oracle["mean"], color="tab:red", ls=":", lw=1, label=f"oracle ({main})")
    ax.set_yticks(y, [method_label(m, main) for m in methods], fontsize=9)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("test loss (mean over tasks ± se across tasks); right: inference cost per token")
    ax.set_title(
        f"Figure 2: test loss and inference cost per method ({_library_text(results)})",
        fontsize=10,
    )
    ax.grid(axis="x", color="0.92")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.55 / (0.3 * n + 0.6)), ncol=5)
    fig.tight_layout()
    return save_png(fig, path)


def figure5(results: dict, path: str | os.PathLike, kind: str | None = None) -> Path | None:
    """Figure 5: probability vs logit ensembling, and low-rank vs full-rank merging.

    Two panels of bars with se bars; a panel whose methods are missing says so. `kind`
    defaults to the study's experts kind. Returns None when neither panel has data.
    """
    kind = kind or study_kinds(results)[0]
    panels = [
        ("Ensembling level", [("ensemble-uniform", "probabilities"),
                              ("ensemble-uniform-logits", "logits")]),
        ("Uniform merging space", [("merge-uniform", "low-rank (A, B)"),
                                   ("merge-uniform-full", "full-rank (BA)")]),
    ]  # fmt: skip
    idx = lookup(results)
    data = [[(label, idx.get((name, kind))) for name, label in p[1]] for p in panels]
    if not any(usable(m) for d in data for _, m in d):
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.6))
    axes = fig.subplots(1, 2)
    for ax, (title, _), d in zip(axes, panels, data):
        _bars(ax, [(label, m) for label, m in d], ["tab:blue", "tab:orange"])
        (_, a), (_, b) = d
        if usable(a) and usable(b):
            s = paired(a, b)
            se = "n/a" if s["se"] is None else f"{s['se']:.3f}"
            title += f"\npaired diff (left - right) {s['diff']:+.3f} ± {se} ({s['n_tasks']} tasks)"
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("test loss (mean ± se)")
    fig.suptitle(f"Figure 5: ensembling level and merging space ({kind} experts)", fontsize=11)
    fig.tight_layout()
    return save_png(fig, path)


def figure4(results: dict, path: str | os.PathLike) -> Path | None:
    """Figure 4: private vs cluster (MBC) experts for oracle, uniform ensembling, uniform
    merging and Arrow top-4, as grouped bars with se bars. None when no method ran with
    both kinds."""
    idx = lookup(results)
    kinds = study_kinds(results)
    groups = [n for n in FIG4_METHODS if any(usable(idx.get((n, k))) for k in kinds)]
    if not any(all(usable(idx.get((n, k))) for k in kinds) for n in groups):
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.8))
    ax = fig.add_subplot()
    width = 0.38
    x = np.arange(len(groups))
    lows, highs, labelled = [], [], set()
    for j, (kind, colour) in enumerate(zip(kinds, KIND_COLOURS)):
        for xi, name in zip(x, groups):
            m = idx.get((name, kind))
            xpos = xi + (j - 0.5) * width
            if not usable(m):
                ax.text(xpos, 0.5, "n/a", ha="center", transform=_xdata_yaxes(ax), fontsize=8)
                continue
            mean, se = m["mean"], m.get("se") or 0.0
            label = None if kind in labelled else kind_title(kind)
            labelled.add(kind)
            ax.bar(xpos, mean, width, yerr=se, color=colour, capsize=3, label=label)
            ax.annotate(f"{mean:.3f}", (xpos, mean + se), xytext=(0, 3), fontsize=7,
                        textcoords="offset points", ha="center", va="bottom")  # fmt: skip
            lows.append(mean - se)
            highs.append(mean + se)
    _zoom(ax, lows, highs)
    ax.set_xticks(x, groups)
    ax.set_ylabel("test loss (mean ± se)")
    ax.set_title("Figure 4: private vs cluster (MBC) experts", fontsize=11)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def sparse_curve(results: dict, path: str | os.PathLike) -> Path | None:
    """The sparse ensemble's training objective against k (the number of experts kept),
    one line per experts kind, from the ensemble-sparse fit's "curve". None without one."""
    curves = {}
    for m in results.get("methods") or []:
        curve = (
            (m.get("fit") or {}).get("curve") if m["name"].startswith("ensemble-sparse") else None
        )
        if curve and curve.get("k") and curve.get("objective"):
            curves.setdefault(m.get("experts") or "private", (curve, m["name"]))
    if not curves:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    for (kind, (curve, name)), colour in zip(curves.items(), ("tab:purple", "tab:cyan", "k")):
        label = kind_title(kind)
        ax.plot(curve["k"], curve["objective"], marker="o", color=colour, label=label)
        _, _, arg = name.partition(":")
        if arg.isdigit():
            ax.axvline(int(arg), color=colour, ls=":", lw=1, label=f"k = {arg} ({name})")
    ax.set_xlabel("number of experts kept k")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("training objective (loss)")
    ax.set_title("Sparse ensemble: objective vs number of experts", fontsize=11)
    ax.grid(color="0.92")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def _bars(ax, items: list[tuple[str, dict | None]], colours: list[str]) -> None:
    lows, highs = [], []
    for i, ((_, m), colour) in enumerate(zip(items, colours)):
        if not usable(m):
            ax.text(i, 0.5, "not measured", ha="center", transform=_xdata_yaxes(ax), fontsize=8)
            continue
        mean, se = m["mean"], m.get("se") or 0.0
        ax.bar(i, mean, 0.6, yerr=se, color=colour, capsize=4)
        ax.annotate(f"{mean:.3f} ± {se:.3f}", (i, mean + se), xytext=(0, 4),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)  # fmt: skip
        lows.append(mean - se)
        highs.append(mean + se)
    ax.set_xticks(range(len(items)), [label for label, _ in items])
    ax.set_xlim(-0.6, len(items) - 0.4)
    _zoom(ax, lows, highs)


def _zoom(ax, lows: list[float], highs: list[float]) -> None:
    """Start the y axis near the data (loss differences are small next to the losses)."""
    if not lows:
        ax.set_yticks([])
        return
    lo, hi = min(lows), max(highs)
    pad = max(hi - lo, 0.05 * max(abs(hi), 1e-3))
    ax.set_ylim(max(0.0, lo - pad), hi + 0.6 * pad)


def _xdata_yaxes(ax):
    from matplotlib.transforms import blended_transform_factory

    return blended_transform_factory(ax.transData, ax.transAxes)


def _short(text: str | None, n: int = 60) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _library_text(results: dict) -> str:
    lib = results.get("library") or {}
    experts = lib.get("experts") or {}
    main = study_kinds(results)[0]
    n = experts.get(main)
    n = len(n) if isinstance(n, list) else "?"
    base = str(lib.get("base_model") or "?")
    base = Path(base).name if base.startswith(("/", ".", "~")) else base  # a local folder
    return f"{base}, {n} {main} experts, {len(lib.get('tasks') or [])} tasks"
