"""Routed models: save, reload with one call, and generate with the KV cache."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from lorafuse.errors import LorafuseError, OutputExistsError
from lorafuse.formats.routed import CONFIG_NAME, load_routed, save_routed
from lorafuse.library import ExpertLibrary
from lorafuse.mixers.routers import build_routers
from lorafuse.model import attach
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


@pytest.mark.parametrize(
    "change, said",
    [
        ({"space": "both"}, "field 'space': expected 'factors' or 'deltas', got \"both\""),
        ({"router": 3}, "field 'router': expected 'arrow' or 'linear', got 3"),
        ({"top_k": 0}, "field 'top_k': expected a number > 0, got 0"),
        ({"top_k": "2"}, "field 'top_k': expected an integer, got \"2\""),
        ({"absolute": "no"}, "field 'absolute': expected true or false"),
        ({"experts": [{"name": "e0"}]}, "field 'experts.0.path': missing (expected a string)"),
        ({"experts": "e0,e1"}, "field 'experts': expected a list"),
        ({"modules": None}, "field 'modules': expected a list, got null"),
        ({"router": "arrow", "temperature": None}, "field 'temperature': arrow routers need"),
        ({"router": "arrow", "temperature": float("nan")}, "'temperature': expected a finite"),
    ],
)
def test_bad_routed_json_names_file_and_field(llama_dir, llama_experts, tmp_path, change, said):
    model = load_base(llama_dir)
    fusion = attach(model, ExpertLibrary.load(llama_experts), "factors")
    _trained_like(fusion)
    out = save_routed(fusion, tmp_path / "routed")
    fusion.detach()
    config = json.loads((out / CONFIG_NAME).read_text())
    (out / CONFIG_NAME).write_text(json.dumps({**config, **change}))
    with pytest.raises(LorafuseError, match="routed.json") as info:
        load_routed(model, out)
    assert said in str(info.value)
    assert not any(hasattr(m, "mixer") for m in model.modules())  # nothing left attached


def test_broken_routed_files(llama_dir, llama_experts, tmp_path):
    model = load_base(llama_dir)
    fusion = attach(model, ExpertLibrary.load(llama_experts), "factors")
    _trained_like(fusion)
    out = save_routed(fusion, tmp_path / "routed")
    fusion.detach()
    text = (out / CONFIG_NAME).read_text()
    for bad, said in [
        (text[:50], "not valid JSON (empty or truncated?)"),
        ("[1]", "is not a lorafuse-routed v1 file"),
        (json.dumps({**json.loads(text), "version": 2}), "version 2"),
    ]:
        (out / CONFIG_NAME).write_text(bad)
        with pytest.raises(LorafuseError, match=re.escape(said)):
            load_routed(model, out)
    (out / CONFIG_NAME).write_text(text)
    routers = (out / "routers.safetensors").read_bytes()
    (out / "routers.safetensors").write_bytes(routers[:100])
    with pytest.raises(LorafuseError, match="routers.safetensors is not a readable safetensors"):
        load_routed(model, out)
    from safetensors.torch import load_file, save_file

    (out / "routers.safetensors").write_bytes(routers)
    state = load_file(str(out / "routers.safetensors"))
    save_file({k: v for k, v in state.items() if not k.endswith(".bias")}, str(out / "r.st"))
    (out / "r.st").replace(out / "routers.safetensors")
    with pytest.raises(LorafuseError, match=r"router needs tensors \['weight', 'bias'\]"):
        load_routed(model, out)
    assert not any(hasattr(m, "mixer") for m in model.modules())
