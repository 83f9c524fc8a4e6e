"""Every figure lorafuse draws: the study's, from a results dict (no model code), and
the analyses' (similarity heat map, mode connectivity, greedy selection, minimax LP).

Every function writes one PNG atomically (`lorafuse.io.save_png`, ~150 dpi) and returns
its path, or returns None without writing when the results lack its data. Figures are
built with `matplotlib.figure.Figure` (the Agg canvas), never pyplot, so no display and
no global state is touched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lorafuse.io import save_png
from lorafuse.study.claims import lookup, paired, study_kinds, usable

if TYPE_CHECKING:
    from lorafuse.select.clustering import Clustering

from lorafuse.study.labels import (
    FAMILIES,
    beyond_note,
    cost_text,
    kind_title,
    marked_label,
    method_label,  # noqa: F401  (render, headline and render_seeds import it from here)
    ordered,
)

FAMILY_TITLES = dict(zip(FAMILIES, ("baselines", "ensembling", "merging", "routing")))
COLOURS = {
    "baseline": "tab:gray",
    "ensembling": "tab:blue",
    "merging": "tab:orange",
    "routing": "tab:green",
}
KIND_COLOURS = ("tab:purple", "tab:cyan")  # the study's experts kind, its cluster kind
FIG4_METHODS = ("oracle", "ensemble-uniform", "merge-uniform", "arrow-top4")


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
    ax.set_yticks(y, [marked_label(m, main) for m in methods], fontsize=9)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("test loss (mean over tasks ± se across tasks); right: inference cost per token")
    note = beyond_note(methods)
    ax.set_title(
        f"Figure 2: test loss and inference cost per method ({_library_text(results)})"
        + (f"\n{note}" if note else ""),
        fontsize=10,
    )
    ax.grid(axis="x", color="0.92")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.55 / (0.3 * n + 0.6)), ncol=5)
    fig.tight_layout()
    return save_png(fig, path)


def figure2_answers(results: dict, path: str | os.PathLike) -> Path | None:
    """Beside Figure 2: exact match and Rouge-L (mean over tasks +- se) of every method's
    greedy answers, the methods in Figure 2's order, one panel per metric. Returns None
    when no method has scored answers."""
    from matplotlib.figure import Figure

    methods = ordered(results)
    scored = [(m.get("answers") or {}) for m in methods]
    if not any("exact_match" in a for a in scored):
        return None
    n = len(methods)
    fig = Figure(figsize=(10, 1.6 + 0.3 * n))
    y = np.arange(n)[::-1]  # first method on top, as in Figure 2
    main = study_kinds(results)[0]
    for i, (metric, title) in enumerate((("exact_match", "exact match"), ("rouge_l", "Rouge-L"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for yi, m, a in zip(y, methods, scored):
            if metric in a:
                colour = COLOURS.get(m.get("family"), "black")
                s = a[metric]
                ax.errorbar(s["mean"], yi, xerr=s.get("se") or 0.0, fmt="o", color=colour,
                            ms=6, capsize=3)  # fmt: skip
            else:
                ax.text(0.02, yi, "no answers", va="center", fontsize=8, color="tab:red")
        ax.set_yticks(y, [marked_label(m, main) for m in methods] if i == 0 else [], fontsize=9)
        ax.set_ylim(-0.7, n - 0.3)
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel(f"{title} (mean over tasks ± se; higher is better)")
        ax.grid(axis="x", color="0.92")
    note = beyond_note(methods)
    fig.suptitle(
        f"Generated answers per method ({_library_text(results)})" + (f"; {note}" if note else ""),
        fontsize=10,
    )
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


def plot_similarity(
    result: Clustering,
    path: str | os.PathLike,
    names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Heat map of S with experts grouped by cluster and each cluster's block outlined.

    The colour scale spans the off-diagonal similarities (their 1st to 99th percentile;
    the diagonal is 1 by construction and would wash the structure out), with a colour
    bar. `names` (N,) labels the axes when given (up to 80 experts). The PNG is written
    atomically; returns the path.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    order = np.argsort(result.labels, kind="stable")  # (N,)
    S = result.similarity[np.ix_(order, order)]  # (N, N)
    N = len(order)
    off = S[~np.eye(N, dtype=bool)]  # (N*(N-1),)
    lo, hi = np.percentile(off, [1, 99]) if off.size else (-1.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    side = min(14.0, max(6.0, 2.5 + 0.16 * N))
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot()
    im = ax.imshow(S, cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
    fig.colorbar(
        im, ax=ax, extend="both", shrink=0.8, label="cosine similarity (off-diagonal range)"
    )
    edges = np.concatenate([[0], np.cumsum([len(c) for c in result.clusters])])  # (C+1,)
    for e in edges[1:-1]:
        ax.axhline(e - 0.5, color="white", lw=0.6, alpha=0.7)
        ax.axvline(e - 0.5, color="white", lw=0.6, alpha=0.7)
    for c, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        box = Rectangle((a - 0.5, a - 0.5), b - a, b - a, fill=False, ec="red", lw=1.8)
        ax.add_patch(box)
        ax.text(b - 0.5, a - 0.5, f" c{c}", color="red", fontsize=8, ha="left", va="bottom")
    if names is not None and len(names) == N and N <= 80:
        ticks = [names[i] for i in order]
        size = 7 if N <= 40 else 5
        ax.set_xticks(range(N), ticks, rotation=90, fontsize=size)
        ax.set_yticks(range(N), ticks, fontsize=size)
    else:
        ax.set_xlabel("experts, ordered by cluster")
    ax.set_title(title or f"MBC: {len(result.clusters)} clusters of {N} experts", pad=14)
    fig.tight_layout()
    return save_png(fig, path)


def plot_connectivity(curves: list[dict[str, Any]], path: str | Path) -> Path:
    """Figure 3: one panel per pair, loss along alpha next to the per-input oracle."""
    from matplotlib.figure import Figure

    n = len(curves)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    for i, c in enumerate(curves):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(c["alphas"], c["loss"], marker=".", color="tab:blue", label="interpolation")
        ax.axhline(c["oracle"], color="tab:pink", lw=2, label="per-input oracle")
        same = c.get("same_family")
        kin = "" if same is None else (" (same family)" if same else " (other families)")
        ax.set_title(f"{c['pair'][0]} -> {c['pair'][1]}{kin}", fontsize=9)
        ax.set_xlabel("alpha")
        ax.set_ylabel("loss on both tasks")
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def plot_greedy(
    curve: Sequence[float],
    target: float,
    path: str | os.PathLike,
    k_reached: int | None = None,
    oracle: float | None = None,
    title: str | None = None,
) -> Path:
    """Figure 7: mean task loss against the number of experts k; PNG written atomically.

    `curve` (K,) is greedy selection's loss with k = 1..K experts (lorafuse.select.greedy).
    Draws a horizontal line at `target` (and at `oracle` when given) and marks
    `k_reached`. Returns the written path.
    """
    from matplotlib.figure import Figure

    k = np.arange(1, len(curve) + 1)  # (K,)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot(k, curve, marker=".", color="tab:blue", label="greedy selection")
    ax.axhline(target, color="tab:gray", ls="--", label=f"target {target:.4f}")
    if oracle is not None:
        ax.axhline(oracle, color="tab:red", ls=":", label=f"private oracle {oracle:.4f}")
    if k_reached is not None:
        ax.axvline(k_reached, color="tab:green", ls=":", label=f"k = {k_reached}")
    ax.set_xlabel("number of experts k")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("mean task loss")
    ax.set_title(title or "Greedy task-level expert selection")
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path)


def plot_minimax(
    weights: Sequence[float], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Figure 6: the minimax LP's coefficients (N,) sorted from largest, as bars.

    The title states the fraction of nonzero coefficients (> lorafuse.fit.minimax's
    NONZERO). The PNG is written atomically; returns the written path.
    """
    from matplotlib.figure import Figure

    from lorafuse.fit.minimax import NONZERO

    w = np.sort(np.asarray(weights, dtype=float))[::-1]  # (N,)
    frac_nonzero = float((w > NONZERO).mean())
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.bar(np.arange(1, len(w) + 1), w, width=1.0, color="tab:blue")
    ax.set_xlabel("expert (sorted by coefficient)")
    ax.set_ylabel("coefficient $\\lambda_i$")
    head = title or "Minimax LP ensemble coefficients"
    ax.set_title(f"{head}: {frac_nonzero:.0%} nonzero (> {NONZERO:g})")
    fig.tight_layout()
    return save_png(fig, path)
