"""Shared fixtures: pico Llama and GPT-2 models and random PEFT adapters, built locally."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The compiled CPU kernels (lorafuse.fast.kernels) build into a cache of this session's own.
os.environ.setdefault("LORAFUSE_CACHE", tempfile.mkdtemp(prefix="lorafuse-test-cache-"))
torch.set_num_threads(1)  # tiny models: one thread is fastest, and robust on a busy CPU

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def make_llama(path: Path) -> Path:
    """A pico Llama (hidden 32, 2 layers) saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def make_gpt2(path: Path) -> Path:
    """A pico GPT-2 (Conv1D layers, hidden 32, 2 layers) saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def load_base(path: Path):
    """The saved pico model in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def make_adapter(base_path: Path, out: Path, seed: int, targets: list[str], **lora) -> Path:
    """A random PEFT LoRA adapter (init_lora_weights=False) saved at `out`."""
    from peft import LoraConfig, get_peft_model

    base = load_base(base_path)
    torch.manual_seed(seed)
    cfg = LoraConfig(target_modules=targets, init_lora_weights=False, lora_dropout=0.0, **lora)
    model = get_peft_model(base, cfg)
    model.save_pretrained(out)
    return out


def peft_logits(base_dir, expert_dirs, tokens, weights=None):
    """Logits of plain PEFT: one adapter, or add_weighted_adapter(cat) of several."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base_dir), expert_dirs[0], adapter_name="a0")
    if weights is None:
        return model.eval()(tokens).logits
    names = ["a0"]
    for i, d in enumerate(expert_dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{i}")
        names.append(f"a{i}")
    model.add_weighted_adapter(names, list(weights), "mix", combination_type="cat")
    model.set_adapter("mix")
    return model.eval()(tokens).logits


# Mixed ranks, alphas, rsLoRA and rank/alpha patterns: the library must handle them all.
LLAMA_EXPERTS = [
    {"r": 4, "lora_alpha": 16},
    {"r": 2, "lora_alpha": 8},
    {"r": 4, "lora_alpha": 4, "use_rslora": True},
    {"r": 3, "lora_alpha": 16, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 5}},
]


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return make_gpt2(tmp_path_factory.mktemp("gpt2") / "base")


@pytest.fixture(scope="session")
def llama_experts(llama_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("llama_experts")
    return [
        make_adapter(llama_dir, root / f"e{i}", 100 + i, LLAMA_TARGETS, **kw)
        for i, kw in enumerate(LLAMA_EXPERTS)
    ]


@pytest.fixture(scope="session")
def gpt2_experts(gpt2_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("gpt2_experts")
    kws = [{"r": 4, "lora_alpha": 8}, {"r": 2, "lora_alpha": 4}, {"r": 4, "lora_alpha": 2}]
    return [
        make_adapter(gpt2_dir, root / f"g{i}", 200 + i, GPT2_TARGETS, fan_in_fan_out=True, **kw)
        for i, kw in enumerate(kws)
    ]


@pytest.fixture
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 64, (3, 11), generator=g)  # (B, T)


MINI_TASKS = ["upper", "reverse", "count"]


def _mini_rows() -> list[dict]:
    """A few examples per task and split, in the flan-flat schema."""
    rows = []
    words = ["cat", "dog", "bird", "fish", "cow", "ant", "bee", "owl", "elk"]
    for task in MINI_TASKS:
        for i, w in enumerate(words):
            split = "train" if i < 5 else ("validation" if i < 7 else "test")
            target = {"upper": w.upper(), "reverse": w[::-1], "count": str(len(w))}[task]
            rows.append(
                {
                    "source": f"{task}: {w}",
                    "target": target,
                    "task_name": task,
                    "task_source": "mini",
                    "template_type": "zs",
                    "template_idx": 0,
                    "split": split,
                }
            )
    return rows


@pytest.fixture(scope="session")
def mini_bench(tmp_path_factory) -> Path:
    """A benchmark folder: pico Llama + char tokenizer, data, private and shared experts."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafuse.data.flan import write_flan
    from lorafuse.data.tokenizer import char_vocab, save_char_tokenizer

    root = tmp_path_factory.mktemp("mini") / "bench"
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=len(char_vocab()),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    save_char_tokenizer(root / "base")
    write_flan(_mini_rows(), root / "data")
    for i, task in enumerate(MINI_TASKS):
        out = make_adapter(
            root / "base", root / "experts" / "private" / task, 300 + i, ["q_proj", "v_proj"],
            r=4, lora_alpha=8,
        )  # fmt: skip
        (out / "lorafuse_expert.json").write_text(json.dumps({"tasks": [task]}))
    shared = make_adapter(
        root / "base", root / "experts" / "shared" / "shared", 399, ["q_proj", "v_proj"], r=4,
        lora_alpha=8,
    )  # fmt: skip
    (shared / "lorafuse_expert.json").write_text(json.dumps({"tasks": MINI_TASKS}))
    (root / "manifest.json").write_text(json.dumps({"tasks": MINI_TASKS}))
    return root
