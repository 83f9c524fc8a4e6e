"""Run the training loop on a fixed least-squares problem; save the weights (for tests)."""

from __future__ import annotations

import sys

import torch
from torch import nn

from lorafuse.fit.sgd import SGDSettings, train


def problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 3, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(64, generator=g)
    return X, y


def run(settings: SGDSettings, checkpoint=None, progress=None, validate=True):
    """(SGDResult, final weights); `validate` True: the full-data mean squared error,
    False: none, or a callable validate() of its own."""
    X, y = problem()
    w = nn.Parameter(torch.zeros(3))

    def loss_fn(idx):
        return ((X[idx] @ w - y[idx]) ** 2).mean()

    def val():
        with torch.no_grad():
            return float(((X @ w - y) ** 2).mean())

    if callable(validate):
        val = validate
    res = train(
        {"w": w}, loss_fn, len(y), settings, val if validate else None, checkpoint, progress
    )
    return res, w.detach().clone()


if __name__ == "__main__":
    # argv: out.pt, grad_accum. Early stopping on the full-data validation loss, so the
    # processes must agree on the stop as on the weights.
    s = SGDSettings(
        lr=0.2,
        epochs=None,
        batch_size=8,
        grad_accum=int(sys.argv[2]),
        warmup=0.05,
        eval_every=2,
        patience=2,
        min_delta=0.01,
        max_steps=200,
    )
    res, w = run(s)
    from accelerate import Accelerator

    acc = Accelerator()
    if acc.is_main_process:
        record = {"w": w, "steps": torch.tensor(res.steps), "stop": res.stop}
        torch.save({**record, "processes": acc.num_processes}, sys.argv[1])
