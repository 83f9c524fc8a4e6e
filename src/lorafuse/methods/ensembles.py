"""Ensembling methods (paper Section 3, B.3, B.5) and how their coefficients are fitted.

- ensemble-uniform / ensemble-uniform-logits: l = 1/N, probabilities or logits mixed.
- ensemble-exact: the training objective solved to optimality on cached probabilities.
- ensemble-sgd: the paper's way, SGD on softmax weights, on cached probabilities
  (ensemble_sgd.py).
- ensemble-minimax: B.5's LP over the validation loss matrix.
- ensemble-sparse:<k>: the best ensemble of at most k experts (greedy, re-optimised).
- ensemble-distill: one LoRA trained to match the fitted ensemble (methods/distill.py).
"""

from __future__ import annotations

import time
from contextlib import ExitStack

import torch
from pydantic import Field

from lorafuse.cache import expert_target_logprobs
from lorafuse.ensemble import ensemble_logprobs
from lorafuse.errors import LorafuseError
from lorafuse.fit.options import Options
from lorafuse.formats.fits import load_fit
from lorafuse.generate import EnsembleDecoder
from lorafuse.methods.method import Context, Cost, Fitted, Method, Prepared
from lorafuse.model import attached

ROWS_PER_PASS = 256
PER_EXPERT = Cost(passes="per expert")  # one pass per expert with a nonzero weight


class CachedOptions(Options):
    """A fit on the experts' cached passes over the training data."""

    max_examples_per_task: int | None = Field(
        None, ge=1, description="training examples per task (null: all)"
    )


class MinimaxOptions(Options):
    """The minimax LP on the validation loss matrix."""

    max_examples_per_task: int | None = Field(
        None, ge=1, description="validation examples per task when validation_max_per_task is unset"
    )
    validation_max_per_task: int | None = Field(
        None, ge=1, description="validation examples per task of the loss matrix (null: all)"
    )


def validation_cap(options) -> int | None:
    """`validation_max_per_task` when given (null: all), else `max_examples_per_task`."""
    if "validation_max_per_task" in options.model_fields_set:
        return options.validation_max_per_task
    return options.max_examples_per_task


def ensemble_prepared(ctx: Context, weights: torch.Tensor, level: str = "probs") -> Prepared:
    """A Prepared forward of the ensemble of the context's experts with `weights` (N,)."""
    ws = ctx.ws
    w = torch.as_tensor(weights, dtype=torch.float32)
    with ExitStack() as stack:
        fusion = stack.enter_context(attached(ws.model, ctx.library, "factors"))

        def forward(batch):
            t = {k: v.to(ws.device) for k, v in batch.tensors.items()}
            return ensemble_logprobs(ws.model, fusion, t, w, level, ROWS_PER_PASS)

        def decoder(tasks):
            return EnsembleDecoder(ws.model, fusion, w, level)

        info = {"experts": ctx.kind, "level": level, "nonzero": int((w > 0).sum())}
        n = int((w > 0).sum())
        return Prepared(forward, stack.pop_all().close, passes=n, info=info, decoder=decoder)


def uniform_weights(ctx: Context) -> torch.Tensor:
    """1/N for each of the N experts."""
    N = len(ctx.library)
    return torch.full((N,), 1.0 / N)


def fitted_weights(ctx: Context) -> torch.Tensor:
    """The saved fit's ensemble weights (N,)."""
    fit = load_fit(ctx.ws, ctx.name, ctx.kind, need=("weights",))
    return torch.tensor(fit["weights"], dtype=torch.float32)


def prepare_uniform(ctx: Context) -> Prepared:
    return ensemble_prepared(ctx, uniform_weights(ctx), "probs")


def prepare_uniform_logits(ctx: Context) -> Prepared:
    return ensemble_prepared(ctx, uniform_weights(ctx), "logits")


def prepare_fitted(ctx: Context) -> Prepared:
    """The ensemble with the weights of the method's saved fit."""
    return ensemble_prepared(ctx, fitted_weights(ctx))


def train_cache(
    ws,
    kind: str,
    max_per_task: int | None = None,
    split: str = "train",
    cache_dir: str | None = None,
    progress=None,
):
    """Every `kind` expert's cached target-token log-probabilities on `split` (the fits')."""
    cache = cache_dir or f"{ws.fits_dir}/.cache"
    return expert_target_logprobs(ws, kind, split, max_per_task, ROWS_PER_PASS, cache, progress)


def _train_cache(ctx: Context):
    return train_cache(
        ctx.ws, ctx.kind, ctx.options.max_examples_per_task, "train", ctx.cache, ctx.progress
    )


def fit_exact(ctx: Context) -> Fitted:
    """Optimal weights of the training objective, with the Frank-Wolfe gap as certificate."""
    from lorafuse.fit.exact import fit_ensemble

    start = time.perf_counter()
    cached = _train_cache(ctx)
    cache_s = time.perf_counter() - start
    fit = fit_ensemble(cached.logp.double().exp(), cached.token_weights())
    summary = {
        "weights": fit.weights.tolist(),
        "experts_order": cached.experts,
        "gap": fit.gap,
        "iterations": fit.iterations,
        "converged": fit.converged,
        "cache_seconds": round(cache_s, 3),
        "solve_seconds": round(time.perf_counter() - start - cache_s, 3),
    }
    return Fitted(summary, {"objective": fit.objective})


def fit_sparse(ctx: Context) -> Fitted:
    """Greedy best-k ensembles for k = 1..N on the cached training probabilities."""
    from lorafuse.fit.exact import sparse_greedy

    k = _k(ctx.arg, len(ctx.library))
    cached = _train_cache(ctx)
    sparse = sparse_greedy(cached.logp.double().exp(), cached.token_weights())
    return Fitted({
        "weights": sparse.weights[k - 1].tolist(),
        "experts_order": cached.experts,
        "k": k,
        "curve": {"k": list(range(1, len(sparse.order) + 1)), "objective": sparse.objectives},
        "order": [cached.experts[i] for i in sparse.order],
    })  # fmt: skip


def fit_minimax(ctx: Context) -> Fitted:
    """B.5's LP on the validation loss matrix (the study draws its Figure 6)."""
    from lorafuse.fit.minimax import fit_minimax as solve
    from lorafuse.matrix import expert_task_matrix

    matrix = expert_task_matrix(
        ctx.ws, ctx.kind, "validation", validation_cap(ctx.options), ROWS_PER_PASS, ctx.cache,
        ctx.progress,
    )  # fmt: skip
    fit = solve(matrix.losses.numpy())
    return Fitted({
        "weights": [float(x) for x in fit.weights],
        "experts_order": matrix.experts,
        "value": float(fit.value),
        "nonzero_fraction": float(fit.frac_nonzero),
    })  # fmt: skip


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


METHODS = (
    Method(
        "ensemble-uniform",
        "ensembling",
        "mean of the experts' next-token probabilities",
        prepare_uniform,
        cost=PER_EXPERT,
        weights=uniform_weights,
        paper=("fig2", "fig4", "B.3"),
    ),
    Method(
        "ensemble-uniform-logits",
        "ensembling",
        "softmax of the mean of the experts' logits",
        prepare_uniform_logits,
        cost=PER_EXPERT,
        paper=("B.3",),
    ),
    Method(
        "ensemble-exact",
        "ensembling",
        "weights solved to optimality on cached training probabilities",
        prepare_fitted,
        options=CachedOptions,
        fit=fit_exact,
        cost=PER_EXPERT,
        weights=fitted_weights,
    ),
    Method(
        "ensemble-minimax",
        "ensembling",
        "minimax LP over the validation loss matrix (B.5)",
        prepare_fitted,
        options=MinimaxOptions,
        fit=fit_minimax,
        cost=PER_EXPERT,
        weights=fitted_weights,
        paper=("B.5",),
    ),
    Method(
        "ensemble-sparse",
        "ensembling",
        "best ensemble of at most k experts (greedy, weights re-optimised)",
        prepare_fitted,
        options=CachedOptions,
        fit=fit_sparse,
        cost=PER_EXPERT,
        needs_arg=True,
        weights=fitted_weights,
    ),
)
