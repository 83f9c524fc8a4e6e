"""The fused fits' training loss follows the option `objective`, checked by hand."""

from __future__ import annotations

import pytest
import torch

from lorafuse.evaluate import IGNORE
from lorafuse.fit.data import TrainingSet
from lorafuse.methods.fused_sgd import fused_loss
from lorafuse.spec import load_spec
from lorafuse.workspace import Workspace


def _token_nll(ws, data: TrainingSet, idx: list[int]) -> list[list[float]]:
    """Each example's target-token NLLs, one token at a time from the model's logits."""
    t = data.batch(idx)
    with torch.no_grad():
        logp = torch.log_softmax(ws.logits(t).float(), -1)  # (B, T, V)
    out = []
    for b in range(len(idx)):
        labels = t["labels"][b].tolist()
        out.append([-logp[b, k, labels[k + 1]].item() for k in range(len(labels) - 1)
                    if labels[k + 1] != IGNORE])  # fmt: skip
    return out


def test_fused_loss_is_the_task_balanced_or_the_token_mean(mini_bench):
    ws = Workspace(load_spec(mini_bench))
    data = TrainingSet(ws, "train", None, "task")
    idx = [data.tasks.index(t) for t in sorted(set(data.tasks))]  # one example of each task
    idx.append(idx[0] + 1)  # and a second one of the first task
    nll = _token_nll(ws, data, idx)
    assert len({len(x) for x in nll}) > 1  # targets of different lengths: the means differ
    tokens = [x for row in nll for x in row]
    by_token = sum(tokens) / len(tokens)
    w = data.weights.tolist()
    by_task = sum(w[i] * sum(row) / len(row) for i, row in zip(idx, nll)) / len(idx)
    with torch.no_grad():
        task = fused_loss(ws, data)(idx).item()
        token = fused_loss(ws, TrainingSet(ws, "train", None, "token"))(idx).item()
    assert task == pytest.approx(by_task, rel=1e-5)
    assert token == pytest.approx(by_token, rel=1e-5)
    assert abs(by_task - by_token) > 20 * 1e-5 * by_token  # the checks tell them apart
