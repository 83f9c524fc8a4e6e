"""Output-level ensembles against their formulas, computed expert by expert."""

from __future__ import annotations

import pytest
import torch

from lorafuse.ensemble import ensemble_logprobs
from lorafuse.errors import LorafuseError
from lorafuse.library import Expert, ExpertLibrary
from lorafuse.model import attach
from tests.conftest import load_base


@pytest.fixture
def setup(llama_dir, llama_experts, tokens):
    model = load_base(llama_dir)
    lib = ExpertLibrary.load(llama_experts)
    fusion = attach(model, lib)
    per_expert = []
    for i in range(len(lib)):
        fusion.set_expert(i)
        per_expert.append(model(tokens).logits.detach())  # each (B, T, V)
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    return model, fusion, batch, torch.stack(per_expert)  # (N, B, T, V)


def test_probability_and_logit_mixing_equal_their_formulas(setup):
    model, fusion, batch, Z = setup
    w = torch.tensor([0.1, 0.4, 0.3, 0.2])
    probs = ensemble_logprobs(model, fusion, batch, w, "probs", rows_per_pass=6)
    expected = torch.log((w[:, None, None, None] * torch.softmax(Z, -1)).sum(0))
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
    logits = ensemble_logprobs(model, fusion, batch, w, "logits", rows_per_pass=100)
    expected_l = torch.log_softmax((w[:, None, None, None] * Z).sum(0), -1)
    torch.testing.assert_close(logits, expected_l, atol=1e-5, rtol=1e-5)
    assert (probs - logits).abs().max() > 1e-3


def test_one_hot_weights_equal_the_expert(setup):
    model, fusion, batch, Z = setup
    for i in range(4):
        w = torch.nn.functional.one_hot(torch.tensor(i), 4).float()
        out = ensemble_logprobs(model, fusion, batch, w, "probs")
        torch.testing.assert_close(out, torch.log_softmax(Z[i], -1), atol=1e-5, rtol=1e-5)


def test_identical_experts_equal_that_expert(llama_dir, llama_experts, tokens):
    model = load_base(llama_dir)
    one = ExpertLibrary.load([llama_experts[1]])
    idx = torch.zeros(3, dtype=torch.long)  # the same expert three times
    three = ExpertLibrary(
        [Expert(name=f"copy{i}") for i in range(3)],
        {m: s.select(idx) for m, s in one.modules.items()},
    )
    fusion = attach(model, three)
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    out = ensemble_logprobs(model, fusion, batch, torch.tensor([0.2, 0.5, 0.3]), "probs")
    fusion.set_expert(0)
    torch.testing.assert_close(out, torch.log_softmax(model(tokens).logits, -1), atol=1e-5, rtol=0)


def test_gradients_reach_weights_only(setup):
    model, fusion, batch, _ = setup
    theta = torch.zeros(4, requires_grad=True)
    out = ensemble_logprobs(model, fusion, batch, torch.softmax(theta, 0), "probs")
    out[..., 3].sum().backward()
    assert theta.grad is not None and theta.grad.abs().sum() > 0
    with pytest.raises(LorafuseError, match="every ensemble weight is zero"):
        ensemble_logprobs(model, fusion, batch, torch.zeros(4))
    with pytest.raises(LorafuseError, match="unknown ensemble level"):
        ensemble_logprobs(model, fusion, batch, torch.ones(4) / 4, "geometric")
