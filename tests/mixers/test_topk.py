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


@pytest.mark.parametrize("threads", [1, 2])
def test_softmax_equals_torch(threads):
    # Small tensors on several threads take the exp2 path; training and large ones torch's.
    from lorafuse.mixers.topk import softmax

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for z in (torch.randn(4, 1, 6) * 30, torch.randn(300, 200), torch.tensor([[1e4, 0.0]])):
            torch.testing.assert_close(softmax(z), torch.softmax(z, -1))
        z = torch.randn(3, 6, requires_grad=True)
        torch.testing.assert_close(softmax(z), torch.softmax(z, -1))
        assert softmax(z).grad_fn is not None
    finally:
        torch.set_num_threads(before)
