"""Merging and export: round trips through PEFT and transformers, SVD truncation."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorafuse.errors import LorafuseError, OutputExistsError
from lorafuse.library import ExpertLibrary
from lorafuse.linalg import lowrank_svd, truncate_product
from lorafuse.merge import merge, save_adapter, save_merged_model
from lorafuse.model import attach
from tests.conftest import load_base

WEIGHTS = [0.4, 0.1, 0.3, 0.2]


def fused_logits(base_dir, lib, space, weights, tokens):
    model = load_base(base_dir)
    attach(model, lib, space).set_coefficients(torch.tensor(weights))
    return model(tokens).logits


@pytest.mark.parametrize("space", ["factors", "deltas"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_round_trip_through_peft(arch, space, request, tokens, tmp_path):
    base_dir = request.getfixturevalue(f"{arch}_dir")
    lib = ExpertLibrary.load(request.getfixturevalue(f"{arch}_experts"))
    weights = WEIGHTS[: len(lib)]
    merged = merge(lib, weights, space)
    if space == "deltas":  # exact concatenation: rank = sum of the experts' ranks
        assert merged.rank == max(int(m.rank.sum()) for m in lib.modules.values())
    save_adapter(merged, tmp_path / "merged")
    reloaded = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "merged").eval()
    ours = fused_logits(base_dir, lib, space, weights, tokens)
    assert (reloaded(tokens).logits - ours).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_merged_model_equals_fused(arch, request, tokens, tmp_path):
    base_dir = request.getfixturevalue(f"{arch}_dir")
    lib = ExpertLibrary.load(request.getfixturevalue(f"{arch}_experts"))
    weights = WEIGHTS[: len(lib)]
    merged = merge(lib, weights, "factors")
    save_merged_model(load_base(base_dir), merged, tmp_path / "full")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    ours = fused_logits(base_dir, lib, "factors", weights, tokens)
    assert (full(tokens).logits - ours).abs().max() <= 1e-4


def test_lowrank_svd_matches_dense():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(20, 6, generator=g), torch.randn(6, 15, generator=g)
    U, S, Vh = lowrank_svd(B, A)
    dense = torch.linalg.svdvals((B @ A).double())
    torch.testing.assert_close(S.double(), dense[:6], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(U * S @ Vh, B @ A, atol=1e-4, rtol=1e-5)
    Bk, Ak, energy = truncate_product(B, A, 2)
    Ud, Sd, Vhd = torch.linalg.svd((B @ A).double())
    best = (Ud[:, :2] * Sd[:2]) @ Vhd[:2]  # Eckart-Young: the best rank-2 approximation
    torch.testing.assert_close((Bk @ Ak).double(), best, atol=1e-4, rtol=1e-5)
    assert energy == pytest.approx(float((Sd[:2] ** 2).sum() / (Sd**2).sum()), rel=1e-6)


def test_rank_truncation_energy(llama_experts, llama_dir, tokens, tmp_path):
    lib = ExpertLibrary.load(llama_experts)
    full = merge(lib, WEIGHTS, "deltas", rank=64)
    assert full.min_energy() == pytest.approx(1.0)
    low = merge(lib, WEIGHTS, "deltas", rank=2)
    assert low.rank == 2 and 0 < low.min_energy() < 1
    save_adapter(low, tmp_path / "low")
    exact = fused_logits(llama_dir, lib, "deltas", WEIGHTS, tokens)
    trunc = PeftModel.from_pretrained(load_base(llama_dir), tmp_path / "low").eval()
    assert (trunc(tokens).logits - exact).abs().max() > 1e-6  # truncation changes outputs


def test_merge_errors_and_no_overwrite(llama_experts, tmp_path):
    lib = ExpertLibrary.load(llama_experts)
    with pytest.raises(LorafuseError, match="4 numbers"):
        merge(lib, [0.5, 0.5])
    with pytest.raises(LorafuseError, match="unknown mixing space"):
        merge(lib, None, "svd")
    with pytest.raises(LorafuseError, match="positive"):
        merge(lib, None, "deltas", rank=0)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="--force"):
        save_adapter(merge(lib), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    save_adapter(merge(lib), out, force=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_merged_tasks_count_every_module(mini_bench):
    lib = ExpertLibrary.load([mini_bench / "experts" / "private"])
    first, *rest = list(lib.modules)
    N = len(lib)
    # expert 0 weighs nothing on the first module but something on the others
    weights = {m: torch.tensor([0.0] + [1.0 / (N - 1)] * (N - 1)) for m in [first]}
    weights.update({m: torch.full((N,), 1.0 / N) for m in rest})
    merged = merge(lib, weights, "deltas")
    assert merged.meta["tasks"] == sorted(t for e in lib.experts for t in e.tasks)
    only = {m: torch.tensor([0.0] + [1.0] + [0.0] * (N - 2)) for m in lib.modules}
    assert merge(lib, only, "deltas").meta["tasks"] == lib.experts[1].tasks
