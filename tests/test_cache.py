"""Cached target-token log-probabilities against the evaluation of each expert alone."""

from __future__ import annotations

import pytest
import torch

from lorafuse.cache import expert_target_logprobs
from lorafuse.methods.run import evaluate_method
from lorafuse.spec import load_spec
from lorafuse.workspace import Workspace


def test_weighted_token_nll_is_the_evaluation_mean(mini_bench):
    ws = Workspace(load_spec(mini_bench))
    cached = expert_target_logprobs(ws, "private", "train", rows_per_pass=16)
    w = cached.token_weights()
    assert w.sum().item() == pytest.approx(1.0)
    assert cached.logp.shape == (len(w), 3) and (cached.logp <= 0).all()
    for i, name in enumerate(cached.experts):
        expected = evaluate_method(ws, f"single:{name}", "train").mean
        assert float((w * -cached.logp[:, i].double()).sum()) == pytest.approx(expected, abs=1e-5)
    nll = cached.example_nll()  # (N, M)
    counts = torch.bincount(cached.example)
    assert nll.shape == (3, len(cached.tasks)) and (counts > 0).all()


def test_torn_or_foreign_chunks_are_computed_again(mini_bench, tmp_path):
    ws = Workspace(load_spec(mini_bench))
    first = expert_target_logprobs(ws, "private", "test", rows_per_pass=1, cache_dir=tmp_path)
    files = sorted(tmp_path.rglob("chunk_*.pt"))
    assert len(files) == 3
    files[0].write_bytes(files[0].read_bytes()[:50])  # torn
    torch.save({"not": "a chunk"}, files[1])  # foreign
    torch.save((torch.zeros(2, 5), torch.zeros(2)), files[2])  # another shape
    again = expert_target_logprobs(ws, "private", "test", rows_per_pass=1, cache_dir=tmp_path)
    torch.testing.assert_close(again.logp, first.logp)
    assert all(torch.load(f, weights_only=True)[0].shape[1] == 1 for f in files)  # rewritten
