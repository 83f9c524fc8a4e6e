"""HC routing: reductions to plain routing and to merging, against independent paths."""

from __future__ import annotations

import pytest
import torch

from lorafuse.library import ExpertLibrary
from lorafuse.mixers.hierarchical import HCRouter, merged_clusters, within_cluster_softmax
from lorafuse.mixers.routers import LinearRouter
from lorafuse.model import attach
from tests.conftest import load_base


def test_one_expert_per_cluster_is_routing_over_the_experts(llama_dir, llama_experts, tokens):
    lib = ExpertLibrary.load(llama_experts)
    g = torch.Generator().manual_seed(0)
    model = load_base(llama_dir)
    fusion = attach(model, lib)
    hc, plain = {}, {}
    for name in fusion.layers:
        D = lib.modules[name].shape[2]
        w, b = torch.randn(4, D, generator=g), torch.randn(4, generator=g)
        hc[name] = HCRouter(D, torch.arange(4))
        plain[name] = LinearRouter(D, 4)
        with torch.no_grad():
            for r in (hc[name].router, plain[name]):
                r.weight.copy_(w)
                r.bias.copy_(b)
    fusion.set_mixers(hc)
    ours = model(tokens).logits
    fusion.set_mixers(plain)  # a softmax router: on CPU, the compiled kernels' arithmetic
    torch.testing.assert_close(ours, model(tokens).logits, atol=1e-4, rtol=1e-4)


def test_within_cluster_weights_and_coefficients_sum_to_one():
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    w = within_cluster_softmax(torch.randn(6), labels, 3)
    for c in range(3):
        assert w[labels == c].sum().item() == pytest.approx(1.0)
    r = HCRouter(5, labels)
    with torch.no_grad():
        r.theta.copy_(torch.randn(6))
        r.router.weight.copy_(torch.randn(3, 5))
    coeff = r(torch.randn(2, 3, 5))  # (B, T, N)
    torch.testing.assert_close(coeff.sum(-1), torch.ones(2, 3))


def test_merged_clusters_equal_the_uniform_merge_of_members(llama_experts):
    lib = ExpertLibrary.load(llama_experts)
    labels = torch.tensor([1, 0, 1, 0])
    for stacked in lib.modules.values():
        merged = merged_clusters(stacked, labels, 2)
        for c in range(2):
            idx = (labels == c).nonzero().flatten().tolist()
            A = sum(stacked.A[i] for i in idx) / len(idx)  # (R, D)
            B = sum(stacked.scale[i] * stacked.B[i] for i in idx) / len(idx)  # (O, R)
            torch.testing.assert_close(merged.A[c], A)
            torch.testing.assert_close(merged.B[c], B)
