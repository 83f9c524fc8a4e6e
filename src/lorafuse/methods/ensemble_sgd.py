"""ensemble-sgd: the paper's way of learning ensemble weights (Section 3.2.1).

l = softmax(theta), trained by the shared loop with N expert forward passes per step on
training data of all tasks (no task ids), for each learning rate of a grid; the rate with
the lowest validation loss wins. Validation uses the cached validation probabilities.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from lorafuse.ensemble import ensemble_logprobs
from lorafuse.evaluate import target_nll
from lorafuse.fit.sgd import lr_grid, settings_from, train
from lorafuse.methods.ensembles import ROWS_PER_PASS, _fitted, fitted_weights, train_cache
from lorafuse.methods.registry import Method, register
from lorafuse.model import attach


class TrainingSet:
    """Encoded training examples with task-balanced weights (the evaluation's mean)."""

    def __init__(self, ws, split: str = "train", max_per_task: int | None = None):
        from lorafuse.data.collate import encode

        rows = ws.examples(split, max_per_task)
        self.ws = ws
        self.encoded = encode(ws.tokenizer, [(s, t) for s, t, _ in rows])
        tasks = [t for _, _, t in rows]
        counts = {t: tasks.count(t) for t in set(tasks)}
        M, T = len(rows), len(counts)
        self.weights = torch.tensor([M / (T * counts[t]) for t in tasks])  # (M,), mean 1

    def __len__(self) -> int:
        return len(self.encoded)

    def batch(self, idx) -> dict[str, torch.Tensor]:
        """Collated tensors of the examples `idx`, on the workspace's device."""
        from lorafuse.data.collate import collate

        t = collate([self.encoded[i] for i in idx], self.ws.pad_id, self.ws.spec.max_length)
        return {k: v.to(self.ws.device) for k, v in t.items()}


def fit_sgd(ws, kind, arg, options) -> dict[str, Any]:
    """Learn l = softmax(theta) by SGD for each lr of the grid; keep the best on validation.

    The options are those of every SGD fit (`fit.sgd.settings_from`: epochs, max_steps,
    patience, min_delta, eval_every, warmup, ...); the winning rate's run says whether
    the fit converged.
    """
    from lorafuse.fit.exact import ensemble_objective

    data = TrainingSet(ws, "train", options.get("max_examples_per_task"))
    cap = options.get("validation_max_per_task", options.get("max_examples_per_task"))
    val_options = {**options, "progress": None, "max_examples_per_task": cap}
    val = train_cache(ws, kind, val_options, split="validation")
    P_val, w_val = val.logp.double().exp(), val.token_weights()
    lib = ws.library(kind)
    fusion = attach(ws.model, lib, "factors")
    runs, best = [], None
    start = time.perf_counter()
    try:
        for lr in lr_grid(options):
            theta = nn.Parameter(torch.zeros(len(lib)))

            def loss_fn(idx, theta=theta):
                t = data.batch(idx)
                logp = ensemble_logprobs(
                    ws.model, fusion, t, torch.softmax(theta, 0), "probs", ROWS_PER_PASS
                )  # (B, T, V)
                s, c = target_nll(logp, t["labels"])  # (B,)
                return (data.weights[list(idx)].to(s.device) * s / c).mean()

            def validate(theta=theta):
                return ensemble_objective(P_val, torch.softmax(theta.detach(), 0), w_val)

            settings = settings_from(options, lr)
            res = train({"theta": theta}, loss_fn, len(data), settings, validate)
            runs.append({"lr": lr, **res.summary(), "history": res.history})
            if best is None or res.best_val < best[1].best_val:
                best = (lr, res)
    finally:
        fusion.detach()
    lr, res = best
    return {
        "weights": torch.softmax(res.state["theta"], 0).tolist(),
        "experts_order": lib.names,
        "lr": lr,
        "validation_objective": res.best_val,
        **res.summary(),
        "runs": runs,
        "seconds": round(time.perf_counter() - start, 3),
    }


register(
    Method(
        "ensemble-sgd",
        "ensembling",
        "softmax weights learned by SGD with N forward passes per step (the paper's way)",
        _fitted("ensemble-sgd"),
        fit=fit_sgd,
        weights=fitted_weights("ensemble-sgd"),
    )
)
