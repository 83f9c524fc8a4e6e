"""Ensembling methods (paper Section 3, B.3, B.5) and how their coefficients are fitted.

- ensemble-uniform / ensemble-uniform-logits: l = 1/N, probabilities or logits mixed.
- ensemble-exact: the training objective solved to optimality on cached probabilities.
- ensemble-sgd: the paper's way, SGD with N forward passes per step, lr by validation.
- ensemble-minimax: B.5's LP over the validation loss matrix.
- ensemble-sparse:<k>: the best ensemble of at most k experts (greedy, re-optimised).
- ensemble-distill: one LoRA trained to match the fitted ensemble (methods/distill.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from lorafuse.cache import expert_target_logprobs
from lorafuse.ensemble import ensemble_logprobs
from lorafuse.errors import LorafuseError
from lorafuse.formats.fits import load_fit
from lorafuse.methods.registry import Method, Prepared, register
from lorafuse.model import attach

ROWS_PER_PASS = 256


def ensemble_prepared(ws, kind: str, weights: torch.Tensor, level: str = "probs") -> Prepared:
    """A Prepared forward of the ensemble of the `kind` experts with `weights` (N,)."""
    fusion = attach(ws.model, ws.library(kind), "factors")
    w = torch.as_tensor(weights, dtype=torch.float32)

    def forward(batch):
        t = {k: v.to(ws.device) for k, v in batch.tensors.items()}
        return ensemble_logprobs(ws.model, fusion, t, w, level, ROWS_PER_PASS)

    info = {"experts": kind, "level": level, "nonzero": int((w > 0).sum())}
    return Prepared(forward, fusion.detach, passes=int((w > 0).sum()), info=info)


def _uniform(ws, kind) -> torch.Tensor:
    N = len(ws.library(kind))
    return torch.full((N,), 1.0 / N)


def _fitted(name: str):
    def prepare(ws, kind, arg) -> Prepared:
        return ensemble_prepared(ws, kind, fitted_weights(name)(ws, kind, arg))

    return prepare


def fitted_weights(name: str):
    """weights(ws, kind, arg) -> (N,): the saved fit's ensemble weights."""

    def weights(ws, kind, arg) -> torch.Tensor:
        fit = load_fit(ws, f"{name}:{arg}" if arg else name, kind)
        return torch.tensor(fit["weights"], dtype=torch.float32)

    return weights


def train_cache(ws, kind: str, options: dict[str, Any], split: str = "train"):
    """The cached target-token log-probabilities of every expert (shared by the fits)."""
    cache = options.get("cache_dir") or f"{ws.fits_dir}/.cache"
    return expert_target_logprobs(
        ws, kind, split, options.get("max_examples_per_task"), ROWS_PER_PASS, cache,
        options.get("progress"),
    )  # fmt: skip


def fit_exact(ws, kind, arg, options) -> dict[str, Any]:
    """Optimal weights of the training objective, with the Frank-Wolfe gap as certificate."""
    from lorafuse.fit.exact import fit_ensemble

    start = time.perf_counter()
    cached = train_cache(ws, kind, options)
    cache_s = time.perf_counter() - start
    fit = fit_ensemble(cached.logp.double().exp(), cached.token_weights())
    return {
        "weights": fit.weights.tolist(),
        "experts_order": cached.experts,
        "objective": fit.objective,
        "gap": fit.gap,
        "iterations": fit.iterations,
        "converged": fit.converged,
        "cache_seconds": round(cache_s, 3),
        "solve_seconds": round(time.perf_counter() - start - cache_s, 3),
    }


def fit_sparse(ws, kind, arg, options) -> dict[str, Any]:
    """Greedy best-k ensembles for k = 1..N on the cached training probabilities."""
    from lorafuse.fit.exact import sparse_greedy

    k = _k(arg, len(ws.library(kind)))
    cached = train_cache(ws, kind, options)
    sparse = sparse_greedy(cached.logp.double().exp(), cached.token_weights())
    return {
        "weights": sparse.weights[k - 1].tolist(),
        "experts_order": cached.experts,
        "k": k,
        "curve": {"k": list(range(1, len(sparse.order) + 1)), "objective": sparse.objectives},
        "order": [cached.experts[i] for i in sparse.order],
    }


def fit_minimax(ws, kind, arg, options) -> dict[str, Any]:
    """B.5's LP on the validation loss matrix; also plots the coefficients (Figure 6)."""
    from lorafuse.fit.minimax import fit_minimax as solve
    from lorafuse.fit.minimax import plot_minimax
    from lorafuse.matrix import expert_task_matrix

    matrix = expert_task_matrix(
        ws, kind, "validation",
        options.get("validation_max_per_task", options.get("max_examples_per_task")),
        ROWS_PER_PASS,
        options.get("cache_dir") or f"{ws.fits_dir}/.cache", options.get("progress"),
    )  # fmt: skip
    fit = solve(matrix.losses.numpy())
    Path(ws.fits_dir).mkdir(parents=True, exist_ok=True)
    plot = plot_minimax(fit, Path(ws.fits_dir) / f"ensemble-minimax__{kind}.png")
    return {
        "weights": [float(x) for x in fit.weights],
        "experts_order": matrix.experts,
        "value": float(fit.value),
        "nonzero_fraction": float(fit.frac_nonzero),
        "plot": str(plot),
    }


def _k(arg: str | None, N: int) -> int:
    try:
        k = int(arg or "")
    except ValueError:
        raise LorafuseError(
            f"ensemble-sparse needs an integer k (ensemble-sparse:4); got {arg!r}"
        ) from None
    if not 1 <= k <= N:
        raise LorafuseError(f"ensemble-sparse:{k} needs 1 <= k <= {N} (the number of experts)")
    return k


register(
    Method(
        "ensemble-uniform",
        "ensembling",
        "mean of the experts' next-token probabilities",
        lambda ws, kind, arg: ensemble_prepared(ws, kind, _uniform(ws, kind), "probs"),
        weights=lambda ws, kind, arg: _uniform(ws, kind),
    )
)
register(
    Method(
        "ensemble-uniform-logits",
        "ensembling",
        "softmax of the mean of the experts' logits",
        lambda ws, kind, arg: ensemble_prepared(ws, kind, _uniform(ws, kind), "logits"),
    )
)
register(
    Method(
        "ensemble-exact",
        "ensembling",
        "weights solved to optimality on cached training probabilities",
        _fitted("ensemble-exact"),
        weights=fitted_weights("ensemble-exact"),
        fit=fit_exact,
    )
)
register(
    Method(
        "ensemble-minimax",
        "ensembling",
        "minimax LP over the validation loss matrix (B.5)",
        _fitted("ensemble-minimax"),
        weights=fitted_weights("ensemble-minimax"),
        fit=fit_minimax,
    )
)
register(
    Method(
        "ensemble-sparse",
        "ensembling",
        "best ensemble of at most k experts (greedy, weights re-optimised)",
        _fitted("ensemble-sparse"),
        weights=fitted_weights("ensemble-sparse"),
        needs_arg=True,
        fit=fit_sparse,
    )
)
