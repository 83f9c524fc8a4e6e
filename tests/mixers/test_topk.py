"""Top-k helpers against a direct per-row computation."""

from __future__ import annotations

import pytest
import torch

from lorafuse.errors import LorafuseError
from lorafuse.mixers.topk import topk_renormalize, topk_softmax


def test_topk_softmax_matches_rowwise():
    scores = torch.randn(3, 5, 8)
    out = topk_softmax(scores, 3, temperature=0.5)
    for row, got in zip(scores.reshape(-1, 8), out.reshape(-1, 8)):
        keep = sorted(range(8), key=lambda i: -row[i])[:3]
        expected = torch.zeros(8)
        expected[keep] = torch.softmax(row[keep] / 0.5, 0)
        torch.testing.assert_close(got, expected)


def test_topk_renormalize_and_k_equals_n():
    c = torch.softmax(torch.randn(4, 6), -1)
    torch.testing.assert_close(topk_renormalize(c, 6), c)
    torch.testing.assert_close(topk_softmax(c.log(), 6), c)
    r = topk_renormalize(c, 2)
    assert ((r > 0).sum(-1) == 2).all()
    torch.testing.assert_close(r.sum(-1), torch.ones(4))
    with pytest.raises(LorafuseError, match="k=7"):
        topk_renormalize(c, 7)
