"""The NLL protocol against per-token loops and scipy."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import sem

from lorafuse.errors import LorafuseError
from lorafuse.evaluate import (
    IGNORE,
    Result,
    standard_error,
    summarize,
    target_logprobs,
    target_nll,
)


def test_target_nll_equals_token_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 10, generator=g)
    labels = torch.randint(0, 10, (3, 6), generator=g)
    labels[0, :3] = IGNORE
    labels[1, 4:] = IGNORE
    labels[2, :2] = IGNORE
    sums, counts = target_nll(logits, labels)
    logp_all, mask = target_logprobs(logits, labels)
    for b in range(3):
        total, n = 0.0, 0
        for t in range(1, 6):
            if labels[b, t] != IGNORE:
                total -= torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
                n += 1
        assert sums[b].item() == pytest.approx(total, rel=1e-5)
        assert counts[b].item() == n == int(mask[b].sum())
        assert -logp_all[b].sum().item() == pytest.approx(total, rel=1e-5)


def test_standard_error_equals_scipy():
    values = [0.3, 1.7, 0.9, 2.2, 1.1]
    assert standard_error(values) == pytest.approx(float(sem(values)))
    assert standard_error([1.0]) == 0.0


def test_summarize_per_task_then_over_tasks():
    sums = torch.tensor([2.0, 4.0, 9.0, 1.0])
    counts = torch.tensor([2, 2, 3, 1])
    r = summarize(sums, counts, ["a", "a", "b", "c"], "m", "test")
    # Per example 1, 2, 3, 1 -> per task a=1.5, b=3, c=1 -> mean over tasks 11/6.
    assert r.per_task["a"] == {"loss": 1.5, "n_examples": 2}
    assert r.mean == pytest.approx(11 / 6)
    assert r.se == pytest.approx(float(sem([1.5, 3.0, 1.0])))
    assert r.token_mean == pytest.approx(16 / 8)
    assert Result.from_dict(r.to_dict()) == r
    with pytest.raises(LorafuseError, match="no target token"):
        summarize(sums, torch.tensor([2, 0, 3, 1]), ["a", "a", "b", "c"], "m", "test")
    with pytest.raises(LorafuseError, match="no examples"):
        summarize(torch.zeros(0), torch.zeros(0), [], "m", "test")
    with pytest.raises(LorafuseError, match="field 'split': missing"):
        Result.from_dict({"method": "x"})
