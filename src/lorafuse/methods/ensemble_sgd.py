"""ensemble-sgd: the paper's way of learning ensemble weights (Section 3.2.1).

l = softmax(theta), trained by the shared loop on training data of all tasks (no task
ids) with the fits' objective (option `objective`: task-balanced or token-level), for
each learning rate of a grid; the rate with the lowest validation loss (the evaluation's
metric on the cached validation probabilities) wins.

The experts are frozen and run without dropout, so the ensemble's loss on a batch needs
only each expert's log-probability of each target token: the loop reads them from the
cached pass over the training data that ensemble-exact also uses (`train_cache`) instead
of running the N experts' forwards at every step. The gradient is the same as with N
forward passes per step (a test checks the loss against the model's forward), and a step
costs microseconds, so the fit runs to its plateau within the cap.
"""

from __future__ import annotations

import time

import torch
from pydantic import Field
from torch import Tensor, nn

from lorafuse.cache import TargetLogprobs
from lorafuse.fit.data import Objective
from lorafuse.fit.options import GridOptions
from lorafuse.fit.sgd import search_lr, train
from lorafuse.methods.ensembles import (
    PER_EXPERT,
    fitted_weights,
    prepare_fitted,
    train_cache,
    validation_cap,
)
from lorafuse.methods.method import Context, Fitted, Method


class EnsembleSGDOptions(GridOptions):
    """The SGD loop's options; validation on the cached validation probabilities."""

    validation_max_per_task: int | None = Field(
        None, ge=1, description="validation examples per task (default: max_examples_per_task)"
    )


class CachedEnsembleLoss:
    """The probability-level ensemble's training loss from cached target log-probabilities.

    For the examples idx, each example i's summed token NLL s_i = sum_{k of i}
    -log sum_n l_n p_n(y_k) and its number of target tokens c_i go through the fits' one
    `Objective` ("task": mean over idx of w_i s_i / c_i with w_i the task-balanced weight,
    as `TrainingSet`; "token": sum s_i / sum c_i): what `ensemble_logprobs` and
    `target_nll` give through the model for the same examples.
    """

    def __init__(self, cached: TargetLogprobs, objective: str = "task"):
        self.logp = cached.logp  # (K, N)
        self.example = cached.example  # (K,)
        self.n = len(cached.tasks)  # M
        self.counts = torch.bincount(self.example, minlength=self.n)  # (M,)
        self.objective = Objective(cached.tasks, objective)

    def __len__(self) -> int:
        return self.n

    def __call__(self, l: Tensor, idx) -> Tensor:
        """The training objective over the examples `idx` of the ensemble `l` (N,)."""
        idx = torch.as_tensor(list(idx), dtype=torch.long)  # (B,)
        tokens = torch.isin(self.example, idx)  # (K,)
        nll = -torch.logsumexp(self.logp[tokens] + l.log()[None, :], 1)  # (k,)
        sums = nll.new_zeros(self.n).index_add(0, self.example[tokens], nll)  # (M,)
        return self.objective(idx.tolist(), sums[idx], self.counts[idx].to(nll.dtype))


def fit_sgd(ctx: Context) -> Fitted:
    """Learn l = softmax(theta) by SGD for each lr of the grid; keep the best on validation.

    The winning rate's run says whether the fit converged.
    """
    from lorafuse.fit.exact import ensemble_objective

    ws, options, lib = ctx.ws, ctx.options, ctx.library
    start = time.perf_counter()
    data = CachedEnsembleLoss(
        train_cache(ws, ctx.kind, options.max_examples_per_task, "train", ctx.cache, ctx.progress),
        options.objective,
    )
    val = train_cache(ws, ctx.kind, validation_cap(options), "validation", ctx.cache)
    P_val, w_val = val.logp.double().exp(), val.token_weights()
    cache_s = time.perf_counter() - start

    def run(lr: float):
        theta = nn.Parameter(torch.zeros(len(lib)))

        def loss_fn(idx):
            return data(torch.softmax(theta, 0), idx)

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
        "cache_seconds": round(cache_s, 3),
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
        "softmax weights learned by SGD (the paper's way), on cached expert probabilities",
        prepare_fitted,
        options=EnsembleSGDOptions,
        fit=fit_sgd,
        cost=PER_EXPERT,
        weights=fitted_weights,
        paper=("fig2",),
    ),
)
