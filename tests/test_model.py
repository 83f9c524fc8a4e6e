"""Attaching a library to transformers models, checked against PEFT's own forward."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from lorafuse.errors import LibraryMismatchError, LorafuseError
from lorafuse.library import ExpertLibrary
from lorafuse.mixers import Learned
from lorafuse.model import attach
from tests.conftest import load_base, peft_logits


@pytest.mark.parametrize("space", ["factors", "deltas"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_hot_equals_peft_single_adapter(arch, space, request, tokens):
    base_dir = request.getfixturevalue(f"{arch}_dir")
    experts = request.getfixturevalue(f"{arch}_experts")
    lib = ExpertLibrary.load(experts)
    model = load_base(base_dir)
    fusion = attach(model, lib, space)
    for i, d in enumerate(experts):
        fusion.set_expert(i)
        ours = model(tokens).logits
        ref = peft_logits(base_dir, [d], tokens)
        assert (ref - load_base(base_dir)(tokens).logits).abs().max() > 1e-3  # not a no-op
        assert (ours - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_deltas_equal_peft_cat(arch, request, tokens):
    base_dir = request.getfixturevalue(f"{arch}_dir")
    experts = request.getfixturevalue(f"{arch}_experts")
    weights = [0.5, -0.2, 0.7, 0.3][: len(experts)]
    model = load_base(base_dir)
    fusion = attach(model, ExpertLibrary.load(experts), "deltas")
    fusion.set_coefficients(torch.tensor(weights))
    ref = peft_logits(base_dir, experts, tokens, weights)
    assert (model(tokens).logits - ref).abs().max() <= 1e-5


def test_per_layer_coefficients_and_detach(llama_dir, llama_experts, tokens):
    lib = ExpertLibrary.load(llama_experts)
    model = load_base(llama_dir)
    plain = model(tokens).logits
    fusion = attach(model, lib, "factors")
    one_hots = torch.eye(len(lib))
    # Each layer its own coefficients: layer 0 modules use expert 0, layer 1 expert 2.
    per_layer = {m: one_hots[0 if ".0." in m else 2] for m in lib.modules}
    fusion.set_coefficients(per_layer)
    mixed = model(tokens).logits
    # Independent check: PEFT with expert 0's layer-0 tensors and expert 2's layer-1 tensors.
    ref = PeftModel.from_pretrained(load_base(llama_dir), llama_experts[0]).eval()
    other = PeftModel.from_pretrained(load_base(llama_dir), llama_experts[2]).eval()
    theirs = dict(other.named_modules())
    for name, mod in ref.named_modules():
        if ".layers.1." in name and hasattr(mod, "lora_A") and "default" in mod.lora_A:
            src = theirs[name]
            mod.lora_A["default"] = src.lora_A["default"]
            mod.lora_B["default"] = src.lora_B["default"]
            mod.scaling["default"] = src.scaling["default"]
            mod.r["default"] = src.r["default"]
    assert (mixed - ref(tokens).logits).abs().max() <= 1e-5
    fusion.set_coefficients(None)
    torch.testing.assert_close(model(tokens).logits, plain)
    fusion.detach()
    assert not any(type(m).__name__ == "FusedLoRALinear" for m in model.modules())
    torch.testing.assert_close(model(tokens).logits, plain)


def test_generate_with_and_without_cache(llama_dir, llama_experts):
    model = load_base(llama_dir)
    fusion = attach(model, ExpertLibrary.load(llama_experts), "factors")
    prompt = torch.tensor([[3, 5, 7, 9], [2, 4, 6, 8]])
    for coefficients in (torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.eye(4)[[1, 3]]):
        fusion.set_coefficients(coefficients)  # global, then one expert per sequence
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        with_cache = model.generate(prompt, use_cache=True, **kw)
        without = model.generate(prompt, use_cache=False, **kw)
        assert torch.equal(with_cache, without)


def test_gradients_reach_shared_and_per_layer_mixers(llama_dir, llama_experts, tokens):
    model = load_base(llama_dir)
    fusion = attach(model, ExpertLibrary.load(llama_experts), "factors")
    shared = Learned(4)
    fusion.set_mixer(shared)
    assert fusion.mixer_parameters() == [shared.logits]
    model(tokens, labels=tokens).loss.backward()
    assert shared.logits.grad.abs().sum() > 0
    per_layer = {m: Learned(4) for m in fusion.layers}
    fusion.set_mixers(per_layer)
    model(tokens, labels=tokens).loss.backward()
    assert len(fusion.mixer_parameters()) == len(per_layer)
    assert all(m.logits.grad.abs().sum() > 0 for m in per_layer.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "logits" not in n)


def test_attach_errors(llama_experts, gpt2_dir, llama_dir):
    lib = ExpertLibrary.load(llama_experts)
    with pytest.raises(LibraryMismatchError, match="does not have"):
        attach(load_base(gpt2_dir), lib)
    model = load_base(llama_dir)
    fusion = attach(model, lib)
    with pytest.raises(LorafuseError, match="fused layers already"):
        attach(model, lib)
    with pytest.raises(LorafuseError, match="4 experts"):
        fusion.set_coefficients(torch.ones(3))
    with pytest.raises(LorafuseError, match="unknown mixing space"):
        attach(load_base(llama_dir), lib, "weights")


def test_detach_all_recovers_a_model_left_fused(llama_dir, llama_experts, tokens):
    from lorafuse.model import detach_all

    model = load_base(llama_dir)
    with torch.no_grad():
        before = model(tokens).logits
    attach(model, ExpertLibrary.load(llama_experts), "factors")  # handle lost, as after an error
    with pytest.raises(LorafuseError, match="fused layers already"):
        attach(model, ExpertLibrary.load(llama_experts), "factors")
    assert detach_all(model) > 0 and detach_all(model) == 0
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before)
    attach(model, ExpertLibrary.load(llama_experts), "factors").detach()


def test_detach_gives_each_weight_its_own_storage(llama_dir, llama_experts):
    model = load_base(llama_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    attach(model, ExpertLibrary.load(llama_experts), "factors").detach()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
        assert p.untyped_storage().nbytes() == p.nbytes, n  # not a view of a fused buffer


def test_attached_detaches_on_every_exit_path(llama_dir, llama_experts, tokens):
    from lorafuse.layer import FusedLoRALinear
    from lorafuse.model import attached

    model = load_base(llama_dir)
    library = ExpertLibrary.load(llama_experts)
    with torch.no_grad():
        before = model(tokens).logits
        with attached(model, library, "factors") as fusion:
            fusion.set_expert(0)
            fused = model(tokens).logits
        with pytest.raises(RuntimeError, match="inside"), attached(model, library, "deltas"):
            raise RuntimeError("an error inside the block")
        with attach(model, library, "factors"):  # a Fusion is a context manager too
            assert any(isinstance(m, FusedLoRALinear) for m in model.modules())
        assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())
        assert torch.equal(model(tokens).logits, before)
    assert not torch.equal(fused, before)
