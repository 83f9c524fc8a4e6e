"""A study's analyses beside the method table, each a cached stage.

- clusters: MBC clustering of the experts, its heat map, and (for a benchmark) the
  adjusted Rand index against the task families;
- connectivity: Figure 3's interpolation curves for same- and cross-family pairs;
- greedy: the expert x task validation matrix, how many experts are not the best on
  their own task, and the greedy selection that recovers the private-oracle loss.
Every analysis uses the study's private experts (`private_experts`), as Section 5 does.
The greedy matrix is measured once, on the full validation split: a benchmark build's
structure stage already holds it (structure.json), so the study reads it from there.
An analysis that fails is recorded with its error; the study goes on.
"""

from __future__ import annotations

import random
import traceback
from pathlib import Path
from typing import Any

from lorafuse.errors import LorafuseError
from lorafuse.study.stages import stage_key

FIGURES = "figures"
GREEDY_SPLIT = ("validation", None)  # the split and cap of the greedy matrix: all of it


def run_analyses(ctx) -> tuple[dict[str, Any], dict[str, str]]:
    """(analyses, figures) of a study context (runner._Context)."""
    cfg = ctx.cfg.analyses
    analyses: dict[str, Any] = {}
    figures: dict[str, str] = {}
    jobs = [
        ("clusters", _clusters, True),
        ("connectivity", _connectivity, cfg.connectivity is not None),
        ("greedy", _greedy, cfg.greedy),
    ]
    for name, job, enabled in jobs:
        if not enabled:
            analyses[name] = None
            continue
        key = stage_key(ctx.setup_key, name, ctx.cfg.private_experts, ctx.caps, ctx.cfg.seed,
                        cfg.model_dump(mode="json"), GREEDY_SPLIT)  # fmt: skip
        try:
            value = ctx.cache.run(f"analysis:{name}", key, lambda job=job: job(ctx))
        except LorafuseError as e:
            value = {"error": str(e)}
        except Exception as e:  # an analysis bug must not lose the methods' results
            value = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(3)}
        figure = value.pop("figure", None) if isinstance(value, dict) else None
        if figure and (ctx.out / figure).is_file():
            figures[name] = figure
        analyses[name] = value
        if name == "greedy" and "error" not in value:
            analyses["not_best_on_own_task"] = value.pop("not_best")
    _fit_figures(ctx, figures)
    return analyses, figures


def _clusters(ctx) -> dict[str, Any]:
    from sklearn.metrics import adjusted_rand_score

    from lorafuse.select.clustering import default_clusters, mbc_cluster
    from lorafuse.study.figures import plot_similarity

    lib = ctx.ws.library(ctx.cfg.private_experts)
    k = ctx.cfg.analyses.clusters or default_clusters(len(lib))
    if not 1 <= k <= len(lib):
        raise LorafuseError(f"analyses.clusters = {k} needs 1 <= k <= {len(lib)} experts")
    result = mbc_cluster(lib, k=k, seed=ctx.cfg.seed)
    figure = f"{FIGURES}/clusters.png"
    plot_similarity(result, ctx.out / figure, names=lib.names)
    clusters = [[lib.names[i] for i in c] for c in result.clusters]
    families = _family_of_expert(ctx, lib)
    ari = None
    if families is not None:
        ari = float(adjusted_rand_score([families[n] for n in lib.names], result.labels))
    return {"k": k, "clusters": clusters, "ari": ari, "figure": figure}


def _family_of_expert(ctx, lib) -> dict[str, str] | None:
    """expert -> family of its (single) task, when the setup records families."""
    from lorafuse.formats.manifest import read_manifest

    manifest = Path(ctx.ws.spec.root) / "manifest.json"
    if not manifest.is_file():
        return None
    fams = read_manifest(manifest).get("families") or []
    of_task = {t: f["name"] for f in fams for t in f["tasks"]}
    out = {}
    for e in lib.experts:
        names = {of_task.get(t) for t in e.tasks}
        if len(names) != 1 or None in names:
            return None
        out[e.name] = names.pop()
    return out


def _connectivity(ctx) -> dict[str, Any]:
    from lorafuse.select.connectivity import connectivity
    from lorafuse.study.figures import plot_connectivity

    conf = ctx.cfg.analyses.connectivity
    lib = ctx.ws.library(ctx.cfg.private_experts)
    families = _family_of_expert(ctx, lib)
    pairs = conf.pairs if conf.pairs != "auto" else _auto_pairs(lib.names, families, ctx.cfg.seed)
    pairs = pairs[: conf.max_pairs]
    alphas = [i / (conf.alphas - 1) for i in range(conf.alphas)]
    curves = []
    for a, b in pairs:
        c = connectivity(ctx.ws, ctx.cfg.private_experts, (a, b), alphas, "test", ctx.caps["test"])
        c["same_family"] = None if families is None else families[a] == families[b]
        c["oracle_se"] = None
        curves.append(c)
        ctx.bar.advance(1)
    figure = f"{FIGURES}/connectivity.png"
    if curves:
        plot_connectivity(curves, ctx.out / figure)
    return {"curves": curves, "figure": figure if curves else None}


def _auto_pairs(names: list[str], families: dict[str, str] | None, seed: int) -> list[list[str]]:
    """Two same-family and two cross-family pairs (seeded), or the first pairs."""
    rng = random.Random(f"lorafuse-connect:{seed}")
    if families is None:
        return [[names[0], names[i]] for i in range(1, min(3, len(names)))]
    by_family: dict[str, list[str]] = {}
    for n in names:
        by_family.setdefault(families[n], []).append(n)
    same = [sorted(v)[:2] for v in by_family.values() if len(v) >= 2]
    rng.shuffle(same)
    fams = sorted(by_family)
    cross = []
    if len(fams) >= 2:
        for _ in range(2):
            f1, f2 = rng.sample(fams, 2)
            cross.append([rng.choice(by_family[f1]), rng.choice(by_family[f2])])
    return same[:2] + cross


def _greedy(ctx) -> dict[str, Any]:
    from lorafuse.matrix import expert_task_matrix
    from lorafuse.methods.ensembles import ROWS_PER_PASS
    from lorafuse.select.greedy import greedy_select, not_best_on_own_task, private_oracle_loss
    from lorafuse.study.figures import plot_greedy

    kind = ctx.cfg.private_experts
    m = _built_matrix(ctx.ws, kind)
    if m is None:
        split, cap = GREEDY_SPLIT
        m = expert_task_matrix(
            ctx.ws, kind, split, cap, ROWS_PER_PASS, ctx.cache_dir, ctx.bar.advance
        )
    L = m.losses.numpy()  # (N, T)
    own = m.own_index()
    has_own = all(i is not None for i in own)
    oracle = private_oracle_loss(L, own) if has_own else None
    sel = greedy_select(L, target=oracle)
    figure = f"{FIGURES}/greedy.png"
    title = f"greedy selection ({len(L)} experts)"
    plot_greedy(sel.curve, sel.target, ctx.out / figure, sel.k_reached, oracle, title)
    bad = not_best_on_own_task(L, own) if any(i is not None for i in own) else []
    return {
        "sizes": list(range(1, len(sel.curve) + 1)),
        "losses": [float(x) for x in sel.curve],
        "private_oracle": oracle,
        "recovers_at": sel.k_reached,
        "n_experts": len(m.experts),
        "split": GREEDY_SPLIT[0],
        "max_examples_per_task": GREEDY_SPLIT[1],
        "from": m.meta.get("from", "measured by the study"),
        "figure": figure,
        "not_best": {
            "count": len(bad),
            "n_experts": len(m.experts),
            "experts": [m.experts[i] for i in bad],
        },
    }


def _built_matrix(ws, kind: str):
    """The private expert x task matrix of a benchmark build's structure stage, when it
    was measured on the full validation split over exactly `kind`'s experts and the
    study's tasks (else None: the study measures it)."""
    from lorafuse.formats.schema import read_json
    from lorafuse.matrix import LossMatrix

    path = Path(ws.spec.root) / "structure.json"
    if not path.is_file():
        return None
    try:  # a file this check cannot use is measured again, not trusted
        saved = read_json(path)
        m = LossMatrix.from_dict(saved["matrix"], path)
    except (KeyError, TypeError, LorafuseError):
        return None
    if saved.get("split") != GREEDY_SPLIT[0] or saved.get("max_examples_per_task") is not None:
        return None
    if m.experts != ws.library(kind).names or sorted(m.tasks) != sorted(ws.tasks):
        return None
    m.meta = {**m.meta, "from": str(path)}
    return m


def _fit_figures(ctx, figures: dict[str, str]) -> None:
    """Draw the figures of the study's fits (the minimax LP's coefficients, Figure 6)."""
    from lorafuse.formats.fits import fit_path, read_fit
    from lorafuse.study.figures import plot_minimax

    for kind in dict.fromkeys(
        [ctx.cfg.experts, *(m.experts or ctx.cfg.experts for m in ctx.cfg.methods)]
    ):
        fit = fit_path(ctx.ws, "ensemble-minimax", kind)
        if not fit.is_file():
            continue
        weights = read_fit(fit, need=("weights",))["weights"]
        figure = f"{FIGURES}/ensemble-minimax_{kind}.png"
        plot_minimax(weights, ctx.out / figure, f"Minimax LP coefficients ({kind} experts)")
        figures.setdefault("minimax", figure)
