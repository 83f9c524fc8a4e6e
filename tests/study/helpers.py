"""Helpers shared by the study's tests: a results dict shaped like a real run's, and a
check that a figure is a PNG image."""

from __future__ import annotations

import numpy as np
from matplotlib.image import imread

from lorafuse.methods.registry import BY_NAME

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (name, family, experts, mean, passes, relative FLOPs): Figure 2's shape on a small library,
# the paper's protocol: Figure 2 over the cluster (mbc) experts, HC and Figure 4's other side
# over the private ones.
METHODS = [
    ("base", "baseline", "mbc", 1.40, 1, 1.0),
    ("shared", "baseline", "mbc", 1.15, 1, 1.004),
    ("oracle", "baseline", "mbc", 0.85, 1, 1.004),
    ("arrow-top1", "routing", "mbc", 1.35, 1, 1.006),
    ("arrow-top4", "baseline", "mbc", 1.05, 1, 1.02),
    ("ensemble-uniform", "ensembling", "mbc", 0.99, 40, 40.2),
    ("ensemble-uniform-logits", "ensembling", "mbc", 1.03, 40, 40.2),
    ("ensemble-sgd", "ensembling", "mbc", 0.97, 40, 40.2),
    ("ensemble-exact", "ensembling", "mbc", 0.975, 40, 40.2),
    ("ensemble-minimax", "ensembling", "mbc", 1.15, 12, 12.05),
    ("ensemble-sparse:4", "ensembling", "mbc", 1.00, 4, 4.02),
    ("ensemble-distill", "ensembling", "mbc", 0.985, 1, 1.004),
    ("merge-uniform", "merging", "mbc", 1.12, 1, 1.004),
    ("merge-uniform-full", "merging", "mbc", 1.11, 1, 1.0),
    ("merge-sgd-global", "merging", "mbc", 1.05, 1, 1.004),
    ("merge-sgd-layer", "merging", "mbc", 1.07, 1, 1.004),
    ("route-sgd", "routing", "mbc", 0.92, 1, 1.31),
    ("route-sgd-top1", "routing", "mbc", 0.935, 1, 1.31),
    ("route-sgd-top4", "routing", "mbc", 0.922, 1, 1.31),
    ("route-hc", "routing", "private", 1.00, 1, 1.05),
    ("route-arrow-hc", "routing", "private", 0.98, 1, 1.05),
    ("oracle", "baseline", "private", 0.88, 1, 1.004),
    ("ensemble-uniform", "ensembling", "private", 1.02, 40, 40.2),
    ("merge-uniform", "merging", "private", 1.15, 1, 1.004),
    ("arrow-top4", "baseline", "private", 1.00, 1, 1.02),
    ("route-sgd", "routing", "private", 0.95, 1, 1.31),
    ("merge-ties", "merging", "mbc", 1.09, 1, 1.0),
    ("merge-dare-ties", "merging", "mbc", 1.10, 1, 1.0),
    ("merge-search", "merging", "mbc", 1.06, 1, 1.0),
]


def realistic_results(n_tasks: int = 40, seed: int = 0) -> dict:
    """A results dict of the runner's schema with Figure 2-like losses on `n_tasks` tasks."""
    rng = np.random.default_rng(seed)
    tasks = [f"task_{i:02d}" for i in range(n_tasks)]
    difficulty = rng.normal(0.0, 0.3, n_tasks)  # (T,) shared by all methods: pairing matters
    methods = []
    for name, family, kind, mean, passes, rel in METHODS:
        losses = mean + difficulty + rng.normal(0.0, 0.02, n_tasks)  # (T,)
        fit = None
        if name == "ensemble-minimax":
            fit = {"nonzero_fraction": 0.3, "weights": [0.1] * 10}
        if name.startswith("ensemble-sparse"):
            fit = {
                "curve": {
                    "k": list(range(1, 11)),
                    "objective": list(1.3 - 0.3 * (1 - np.exp(-np.arange(10) / 2.5))),
                }
            }
        methods.append(
            {
                "name": name,
                "family": family,
                "experts": kind,
                "status": "ok",
                "error": None,
                "mean": float(losses.mean()),
                "se": float(losses.std(ddof=1) / np.sqrt(n_tasks)),
                "per_task": dict(zip(tasks, map(float, losses))),
                "examples": 20 * n_tasks,
                "cost": {
                    "passes": passes,
                    "added_flops_per_token": 1e6 * (rel - 1),
                    "relative_flops": rel,
                },
                "seconds": {"fit": 12.5 if fit else None, "eval": 3.2},
                "fit": fit,
            }
        )
        if origin := BY_NAME[name.partition(":")[0]].origin:  # beyond the paper
            methods[-1]["origin"] = origin
    methods.append(
        {
            "name": "route-sgd-arrow",
            "family": "routing",
            "experts": "private",
            "status": "failed",
            "error": "RuntimeError: <script>alert('x')</script> & out of memory",
            "mean": None,
            "se": None,
            "per_task": {},
            "examples": 0,
            "cost": {"passes": 1, "added_flops_per_token": 0.0, "relative_flops": 1.3},
            "seconds": {"fit": None, "eval": 0.0},
            "fit": None,
        }
    )
    return {
        "format": "lorafuse-study/1",
        "config": {
            "name": "small",
            "seed": 0,
            "base_model": "pico-llama",
            "experts": "mbc",
            "private_experts": "private",
            "methods": ["all"],
        },
        "library": {
            "base_model": "pico-llama",
            "tasks": tasks,
            "experts": {
                "private": [f"expert_{t}" for t in tasks],
                "mbc": [f"cluster_{i}" for i in range(5)],
                "shared": ["shared"],
            },
            "families": {"qa": tasks[:20], "translate": tasks[20:]},
        },
        "methods": methods,
        "analyses": {
            "clusters": {
                "k": 5,
                "clusters": [[f"expert_{t}" for t in tasks[i::5]] for i in range(5)],
                "ari": 0.62,
            },
            "connectivity": None,
            "greedy": {
                "sizes": list(range(1, 41)),
                "losses": [1.0] * 40,
                "private_oracle": 0.9,
                "recovers_at": 24,
                "n_experts": 40,
            },
            "not_best_on_own_task": {"count": 9, "n_experts": 40, "experts": ["expert_task_03"]},
        },
        "figures": {},
        "stages": {
            "build": {"seconds": 41.2, "cached": False},
            "cache": {"seconds": 80.5, "cached": True},
            "fit:ensemble-sgd": {"seconds": 120.0, "cached": False},
            "evaluate": {"seconds": 300.1, "cached": False},
        },
    }


def is_png(path) -> bool:
    """Whether `path` is a PNG image larger than 100 x 100 pixels."""
    with open(path, "rb") as f:
        if f.read(8) != PNG_MAGIC:
            return False
    img = imread(path)  # (H, W, C)
    return img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
