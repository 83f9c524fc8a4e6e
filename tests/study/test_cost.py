"""Inference cost: the FLOP rules written out by hand on a pico model and library."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafuse.library import ExpertLibrary
from lorafuse.methods.registry import BY_NAME
from lorafuse.study.cost import library_shapes, method_cost


@pytest.fixture(scope="module")
def shapes(llama_dir, llama_experts):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    lib = ExpertLibrary.load(llama_experts)
    return model, lib, library_shapes(model, lib)


def test_base_flops_count_every_matrix_once(shapes):
    model, lib, s = shapes
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert s.base_flops == 2 * linear  # the head is a Linear (untied) in the pico Llama
    assert s.experts == len(lib)


def test_rules(shapes):
    _, lib, s = shapes
    one = sum(2 * m.B.shape[2] * (m.A.shape[2] + m.B.shape[1]) for m in lib.modules.values())
    router = sum(2 * m.A.shape[2] * len(lib) for m in lib.modules.values())
    N = len(lib)
    assert method_cost(BY_NAME["base"].cost, {}, s)["relative_flops"] == 1
    assert method_cost(BY_NAME["merge-sgd-layer"].cost, {}, s)["added_flops_per_token"] == 0
    assert method_cost(BY_NAME["oracle"].cost, {}, s)["added_flops_per_token"] == one
    ens = method_cost(BY_NAME["ensemble-exact"].cost, {"passes": 2}, s)
    assert ens["passes"] == 2
    assert ens["relative_flops"] == pytest.approx(2 * (s.base_flops + one) / s.base_flops)
    dense = method_cost(BY_NAME["route-sgd"].cost, {"top_k": None}, s)
    assert dense["added_flops_per_token"] == N * one + router
    top1 = method_cost(BY_NAME["route-sgd-top1"].cost, {"top_k": 1}, s)
    assert top1["added_flops_per_token"] == one + router
    hc = method_cost(BY_NAME["route-hc"].cost, {"clusters": 2}, s)
    assert hc["added_flops_per_token"] == 2 * one + router * 2 / N
    arrow = method_cost(BY_NAME["arrow-top1"].cost, {"top_k": 1}, s)
    assert arrow["added_flops_per_token"] == one + router
    distill = method_cost(BY_NAME["ensemble-distill"].cost, {}, s)
    assert distill["passes"] == 1 and distill["added_flops_per_token"] == one
    assert method_cost(BY_NAME["merge-uniform"].cost, {}, s)["added_flops_per_token"] == 0


def test_every_method_declares_a_cost_the_study_can_count(shapes):
    from lorafuse.methods.registry import METHODS

    _, _, s = shapes
    for m in METHODS:
        c = method_cost(m.cost, {"passes": 1, "top_k": None, "clusters": 2}, s)
        assert c["relative_flops"] >= 1, m.name
