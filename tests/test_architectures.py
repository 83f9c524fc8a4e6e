"""Every transformers causal-LM family we claim to fuse (issue 17), on tiny random models.

For each family: three random PEFT experts of different ranks on different modules,
named as the family names them (fused qkv projections, GPT-2's Conv1D, Mixtral's
attention beside its fused MoE experts), then
- one-hot coefficients equal PeftModel with that expert alone (both spaces);
- uniform deltas equal PEFT's add_weighted_adapter(..., combination_type="cat");
- detach restores the base logits exactly;
- routed generation (Arrow routers, coefficients per token and layer) gives the same
  greedy tokens with the KV cache as without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from peft import PeftModel

from lorafuse.library import ExpertLibrary
from lorafuse.mixers.routers import build_routers
from lorafuse.model import attach
from tests.conftest import load_base, make_adapter

VOCAB = 64
IDS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
STD = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=64,
)
GQA = dict(STD, num_key_value_heads=2)
LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_MLP = ["gate_proj", "up_proj", "down_proj"]
NEOX_ATTN, NEOX_MLP = ["query_key_value", "dense"], ["dense_h_to_4h", "dense_4h_to_h"]


@dataclass(frozen=True)
class Family:
    """A tiny config and three experts: (targets, rank, alpha) each."""

    config: str  # the transformers config class
    kwargs: dict
    first: list[str]  # expert 0: part of the attention
    attention: list[str]  # expert 1: attention + MLP
    mlp: list[str]
    third: list[str]  # expert 2: another part, rank 3
    fan_in_fan_out: bool = False  # GPT-2's Conv1D stores its weight (D, O)

    def experts(self) -> list[tuple[list[str], int, int]]:
        return [(self.first, 2, 4), (self.attention + self.mlp, 4, 8), (self.third, 3, 9)]


def _llama_like(config: str, **kw) -> Family:
    return Family(config, kw, ["q_proj", "v_proj"], LLAMA_ATTN, LLAMA_MLP, ["k_proj", "down_proj"])


def _neox_like(config: str, **kw) -> Family:
    return Family(config, kw, ["query_key_value"], NEOX_ATTN, NEOX_MLP, ["dense", "dense_4h_to_h"])


FAMILIES = {
    "llama": _llama_like("LlamaConfig", **GQA),
    "mistral": _llama_like("MistralConfig", **GQA),
    "qwen2": _llama_like("Qwen2Config", **GQA),  # biases on q, k, v
    "qwen3": _llama_like("Qwen3Config", **GQA, head_dim=8),  # q/k norms
    "phi": Family(
        "PhiConfig",
        STD,
        ["q_proj", "v_proj"],
        ["q_proj", "k_proj", "v_proj", "dense"],
        ["fc1", "fc2"],
        ["dense", "fc2"],
    ),
    "phi3": Family(
        "Phi3Config",
        STD,
        ["qkv_proj"],
        ["qkv_proj", "o_proj"],
        ["gate_up_proj", "down_proj"],
        ["o_proj", "down_proj"],
    ),  # fused qkv and gate_up
    "gemma": _llama_like("GemmaConfig", **GQA, head_dim=8),
    "gemma2": _llama_like("Gemma2Config", **GQA, head_dim=8),  # soft-capping, sliding window
    "gpt2": Family(
        "GPT2Config",
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
        ["c_attn"],
        ["c_attn", "c_proj"],
        ["c_fc"],
        ["c_proj"],
        fan_in_fan_out=True,
    ),  # Conv1D; c_proj is in both attention and MLP
    "gpt_neox": _neox_like("GPTNeoXConfig", **STD),
    "opt": Family(
        "OPTConfig",
        dict(STD, ffn_dim=48, word_embed_proj_dim=32),
        ["q_proj", "v_proj"],
        ["q_proj", "k_proj", "v_proj", "out_proj"],
        ["fc1", "fc2"],
        ["out_proj", "fc2"],
    ),
    "falcon": _neox_like(
        "FalconConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4
    ),  # FalconLinear, multi-query fused qkv
    "bloom": _neox_like("BloomConfig", hidden_size=32, n_layer=2, n_head=4),  # ALiBi
    "stablelm": _llama_like("StableLmConfig", **GQA),
    "olmo2": _llama_like("Olmo2Config", **GQA),
    # Mixtral's experts are fused parameters, not Linear modules: attention only.
    "mixtral": Family(
        "MixtralConfig",
        dict(GQA, num_local_experts=4, num_experts_per_tok=2),
        ["q_proj", "v_proj"],
        LLAMA_ATTN,
        [],
        ["k_proj", "o_proj"],
    ),
}


@dataclass
class Built:
    base_dir: object
    expert_dirs: list
    tokens: torch.Tensor  # (B, T)
    base_logits: torch.Tensor  # (B, T, V)


@pytest.fixture(scope="module", params=list(FAMILIES))
def built(request, tmp_path_factory) -> Built:
    import transformers
    from transformers import AutoModelForCausalLM

    family = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    cfg = getattr(transformers, family.config)(**IDS, **family.kwargs)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "base")
    dirs = [
        make_adapter(
            root / "base",
            root / f"e{i}",
            700 + i,
            targets,
            r=r,
            lora_alpha=alpha,
            fan_in_fan_out=family.fan_in_fan_out,
        )
        for i, (targets, r, alpha) in enumerate(family.experts())
    ]
    tokens = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = load_base(root / "base")(tokens).logits
    return Built(root / "base", dirs, tokens, logits)


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits  # (B, T, V)


def test_one_hot_equals_peft_with_that_expert_alone(built):
    refs = []
    for d in built.expert_dirs:
        ref = _logits(PeftModel.from_pretrained(load_base(built.base_dir), d).eval(), built.tokens)
        assert (ref - built.base_logits).abs().max() > 1e-4, d.name  # the expert does something
        refs.append(ref)
    library = ExpertLibrary.load(built.expert_dirs)
    model = load_base(built.base_dir)
    for space in ("factors", "deltas"):
        with attach(model, library, space) as fusion:
            for i, ref in enumerate(refs):
                fusion.set_expert(i)
                err = (_logits(model, built.tokens) - ref).abs().max()
                assert err <= 1e-5, (space, i, float(err))


def test_uniform_deltas_equal_peft_cat(built):
    # list targets: PEFT's cat then holds an adapter on every module of the union by name
    names = [f"a{i}" for i in range(len(built.expert_dirs))]
    peft = PeftModel.from_pretrained(
        load_base(built.base_dir), built.expert_dirs[0], adapter_name=names[0]
    )
    for name, d in zip(names[1:], built.expert_dirs[1:]):
        peft.load_adapter(d, adapter_name=name)
    weights = [1 / len(names)] * len(names)
    peft.add_weighted_adapter(names, weights, "mix", combination_type="cat")
    peft.set_adapter("mix")
    ref = _logits(peft.eval(), built.tokens)
    model = load_base(built.base_dir)
    with attach(model, ExpertLibrary.load(built.expert_dirs), "deltas") as fusion:
        fusion.set_coefficients(torch.tensor(weights))
        assert (_logits(model, built.tokens) - ref).abs().max() <= 1e-5


def test_detach_restores_the_base_exactly(built):
    model = load_base(built.base_dir)
    fusion = attach(model, ExpertLibrary.load(built.expert_dirs), "factors")
    assert not torch.equal(_logits(model, built.tokens), built.base_logits)
    fusion.detach()
    assert torch.equal(_logits(model, built.tokens), built.base_logits)


def test_routed_generation_with_the_kv_cache(built):
    model = load_base(built.base_dir)
    library = ExpertLibrary.load(built.expert_dirs)
    with attach(model, library, "factors") as fusion:
        fusion.set_mixers(build_routers(library, router="arrow", top_k=2))
        assert not torch.equal(_logits(model, built.tokens), built.base_logits)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        prompt = built.tokens[:, :4]  # (B, 4)
        with torch.no_grad():
            cached = model.generate(prompt, use_cache=True, **kw)  # (B, 10)
            uncached = model.generate(prompt, use_cache=False, **kw)
        assert cached.shape == (2, 10)
        assert torch.equal(cached, uncached)
