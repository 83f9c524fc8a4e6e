"""ensemble-sgd: the paper's way of learning ensemble weights (Section 3.2.1).

l = softmax(theta), trained by the shared loop with N expert forward passes per step on
training data of all tasks (no task ids), for each learning rate of a grid; the rate with
the lowest validation loss wins. Validation uses the cached validation probabilities.
"""

from __future__ import annotations

import time

import torch
from pydantic import Field
from torch import nn

from lorafuse.ensemble import ensemble_logprobs
from lorafuse.evaluate import target_nll
from lorafuse.fit.data import TrainingSet
from lorafuse.fit.options import GridOptions
from lorafuse.fit.sgd import search_lr, train
from lorafuse.methods.ensembles import (
    PER_EXPERT,
    ROWS_PER_PASS,
    fitted_weights,
    prepare_fitted,
    train_cache,
    validation_cap,
)
from lorafuse.methods.method import Context, Fitted, Method
from lorafuse.model import attached


class EnsembleSGDOptions(GridOptions):
    """The SGD loop's options; validation on the cached validation probabilities."""

    validation_max_per_task: int | None = Field(
        None, ge=1, description="validation examples per task (default: max_examples_per_task)"
    )


def fit_sgd(ctx: Context) -> Fitted:
    """Learn l = softmax(theta) by SGD for each lr of the grid; keep the best on validation.

    The winning rate's run says whether the fit converged.
    """
    from lorafuse.fit.exact import ensemble_objective

    ws, options, lib = ctx.ws, ctx.options, ctx.library
    data = TrainingSet(ws, "train", options.max_examples_per_task)
    val = train_cache(ws, ctx.kind, validation_cap(options), "validation", ctx.cache)
    P_val, w_val = val.logp.double().exp(), val.token_weights()
    start = time.perf_counter()
    with attached(ws.model, lib, "factors") as fusion:

        def run(lr: float):
            theta = nn.Parameter(torch.zeros(len(lib)))

            def loss_fn(idx):
                t = data.batch(idx)
                logp = ensemble_logprobs(
                    ws.model, fusion, t, torch.softmax(theta, 0), "probs", ROWS_PER_PASS
                )  # (B, T, V)
                s, c = target_nll(logp, t["labels"])  # (B,)
                return (data.weights[list(idx)].to(s.device) * s / c).mean()

            def validate():
                return ensemble_objective(P_val, torch.softmax(theta.detach(), 0), w_val)

            return train({"theta": theta}, loss_fn, len(data), options.settings(lr), validate)

        lr, res, runs = search_lr(options.grid(), run)
    summary = {
        "weights": torch.softmax(res.state["theta"], 0).tolist(),
        "experts_order": lib.names,
        "lr": lr,
        **res.summary(),
        "runs": runs,
    }
    detail = {
        "validation_objective": res.best_val,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return Fitted(summary, detail)


METHODS = (
    Method(
        "ensemble-sgd",
        "ensembling",
        "softmax weights learned by SGD with N forward passes per step (the paper's way)",
        prepare_fitted,
        options=EnsembleSGDOptions,
        fit=fit_sgd,
        cost=PER_EXPERT,
        weights=fitted_weights,
    ),
)
