"""Inference cost: the FLOP rules written out by hand on a pico model and library."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafuse.library import ExpertLibrary
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
    assert method_cost("base", "baseline", {}, s)["relative_flops"] == 1
    assert method_cost("merge-sgd-layer", "merging", {}, s)["added_flops_per_token"] == 0
    assert method_cost("oracle", "baseline", {}, s)["added_flops_per_token"] == one
    ens = method_cost("ensemble-exact", "ensembling", {"passes": 2}, s)
    assert ens["passes"] == 2
    assert ens["relative_flops"] == pytest.approx(2 * (s.base_flops + one) / s.base_flops)
    dense = method_cost("route-sgd", "routing", {"top_k": None}, s)
    assert dense["added_flops_per_token"] == N * one + router
    top1 = method_cost("route-sgd-top1", "routing", {"top_k": 1}, s)
    assert top1["added_flops_per_token"] == one + router
    hc = method_cost("route-hc", "routing", {"clusters": 2}, s)
    assert hc["added_flops_per_token"] == 2 * one + router * 2 / N
