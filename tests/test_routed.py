"""Routed models (lorafuse.routed): save, reload with one call, generate with the KV cache;
a bad file attaches nothing. The file schema itself is tests/formats/test_routed.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lorafuse.errors import LorafuseError, OutputExistsError
from lorafuse.formats.routed import CONFIG_NAME, read_routers, write_routed
from lorafuse.library import ExpertLibrary
from lorafuse.mixers.routers import build_routers
from lorafuse.model import attach
from lorafuse.routed import load_routed, save_routed
from tests.conftest import load_base


def _trained_like(fusion, seed=0):
    g = torch.Generator().manual_seed(seed)
    routers = build_routers(fusion.library, "cpu", "linear")
    fusion.set_mixers(routers)
    with torch.no_grad():
        for r in routers.values():
            r.weight.copy_(torch.randn(r.weight.shape, generator=g))
            r.bias.copy_(torch.randn(r.bias.shape, generator=g))
    return routers


@pytest.mark.parametrize("space", ["factors", "deltas"])
def test_save_and_reload_gives_the_same_model(llama_dir, llama_experts, tokens, tmp_path, space):
    model = load_base(llama_dir)
    fusion = attach(model, ExpertLibrary.load(llama_experts), space)
    _trained_like(fusion)
    with torch.no_grad():
        dense = model(tokens).logits
    out = save_routed(fusion, tmp_path / "routed", {"lr": 0.01})
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["space"] == space and config["settings"] == {"lr": 0.01}
    assert [e["name"] for e in config["experts"]] == ["e0", "e1", "e2", "e3"]
    with pytest.raises(OutputExistsError):
        save_routed(fusion, out)
    fusion.detach()

    again = load_base(llama_dir)
    reloaded = load_routed(again, out)  # experts from their recorded folders
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, dense, atol=1e-6, rtol=0)
        reloaded.detach()
        top = load_routed(again, out, top_k=4)  # k = N: dense up to rounding (amplified)
        torch.testing.assert_close(again(tokens).logits, dense, atol=1e-4, rtol=0)
        top.detach()
        one = load_routed(again, out, top_k=1)
        assert not torch.allclose(again(tokens).logits, dense, atol=1e-4)
        one.detach()


def test_arrow_routers_save_too(llama_dir, llama_experts, tokens, tmp_path):
    model = load_base(llama_dir)
    fusion = attach(model, ExpertLibrary.load(llama_experts), "factors")
    fusion.set_mixers(build_routers(fusion.library, "cpu", "arrow", top_k=2, temperature=0.5))
    with torch.no_grad():
        ref = model(tokens).logits
    save_routed(fusion, tmp_path / "arrow")
    fusion.detach()
    again = load_base(llama_dir)
    load_routed(again, tmp_path / "arrow", library=ExpertLibrary.load(llama_experts))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, ref, atol=1e-6, rtol=0)


def test_generate_routes_each_new_token_with_the_kv_cache(llama_dir, llama_experts, tmp_path):
    model = load_base(llama_dir)
    fusion = attach(model, ExpertLibrary.load(llama_experts), "factors")
    _trained_like(fusion, seed=3)
    save_routed(fusion, tmp_path / "routed")
    fusion.detach()
    model = load_base(llama_dir)
    load_routed(model, tmp_path / "routed")
    prompt = torch.tensor([[5, 9, 11, 3], [7, 2, 8, 30]])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
        assert torch.equal(cached, uncached)
        # Greedy by hand: the whole sequence re-run each step, every token routed afresh.
        seq = prompt
        for _ in range(6):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(cached, seq)


def test_load_errors(llama_dir, llama_experts, tmp_path):
    model = load_base(llama_dir)
    with pytest.raises(LorafuseError, match="not a routed model folder"):
        load_routed(model, tmp_path)
    fusion = attach(model, ExpertLibrary.load(llama_experts), "factors")
    with pytest.raises(LorafuseError, match="not a router"):
        save_routed(fusion, tmp_path / "nope")  # uniform mixers are not routers
    _trained_like(fusion)
    out = save_routed(fusion, tmp_path / "routed")
    fusion.detach()
    with pytest.raises(LorafuseError, match="same experts in the same order"):
        load_routed(model, out, library=ExpertLibrary.load(llama_experts[::-1]))
    moved = tmp_path / "moved"
    shutil.copytree(llama_experts[0].parent, moved)
    config = json.loads((out / CONFIG_NAME).read_text())
    config["experts"][0]["path"] = str(tmp_path / "gone")
    (out / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(LorafuseError, match="are missing; pass library="):
        load_routed(model, out)
    fusion = load_routed(model, out, library=ExpertLibrary.load([moved]))
    assert len(fusion.layers) == 14


def test_bad_routed_files_attach_nothing(llama_dir, llama_experts, tmp_path):
    model = load_base(llama_dir)
    fusion = attach(model, ExpertLibrary.load(llama_experts), "factors")
    _trained_like(fusion)
    out = save_routed(fusion, tmp_path / "routed")
    fusion.detach()
    text = (out / CONFIG_NAME).read_text()
    config = json.loads(text)
    (out / CONFIG_NAME).write_text(json.dumps({**config, "modules": config["modules"][1:]}))
    with pytest.raises(LorafuseError, match="routes other modules than the experts adapt"):
        load_routed(model, out)
    assert not any(hasattr(m, "mixer") for m in model.modules())  # nothing left attached
    (out / CONFIG_NAME).write_text(text)
    state = read_routers(out)
    write_routed(out, config, {k: v for k, v in state.items() if not k.endswith(".bias")}, True)
    with pytest.raises(LorafuseError, match=r"router needs tensors \['weight', 'bias'\]"):
        load_routed(model, out)
    assert not any(hasattr(m, "mixer") for m in model.modules())
