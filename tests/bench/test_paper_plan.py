"""bench/paper_plan.py's arithmetic: FLOPs per token against Phi-2's own parameter count,
and the study's tokens against the `full` preset counted out by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import paper_plan  # noqa: E402


def test_flops_per_token_counts_every_product_of_phi2():
    # Phi-2 built on the meta device (no memory): every nn.Linear's weight is one
    # multiply-add per token; attention adds 2 x D per layer per position attended.
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240,
                    num_hidden_layers=32, num_attention_heads=32)  # fmt: skip
    with torch.device("meta"):
        model = PhiForCausalLM(cfg)
    macs = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    seq = 300
    attention = 32 * 2 * 2560 * (seq / 2)
    assert paper_plan.flops_per_token(seq) == pytest.approx(2 * (macs + attention), rel=1e-12)
    assert macs == pytest.approx(2.65e9, rel=0.01)  # Phi-2: 2.7B parameters, embeddings aside


def test_the_stages_count_the_full_presets_tokens():
    from lorafuse.study.config import preset_config

    cfg = preset_config("full")
    L = 100.0
    stages = {s.name: s for s in paper_plan.stages(cfg, L)}
    fit, val, test = (256 * n * L for n in (64, 32, 100))  # the preset's caps per task
    steps = 5 * (256 * 64 // 16)  # epochs x steps per epoch of batch 16
    validations = 3 * -(-steps // 128)  # lr grid x one per eval_every = 128 steps
    route = dict(stages["fit route-sgd"].passes)
    assert route == {"route 10 fwd+bwd": 3 * 5 * fit, "route 10 fwd": validations * val}
    assert dict(stages["evaluate base (test)"].passes) == {"base fwd": test}
    matrix = stages["analyses: expert x task matrix, 256 private x validation"]
    assert matrix.passes == [("one LoRA fwd", 256 * val)]


def test_per_token_is_the_head_and_32_layers():
    t = {"head fwd": 1.0, "head fwd+bwd": 3.0, "layer x fwd": 0.5, "layer x fwd+bwd": 1.5}
    assert paper_plan.per_token(t, "x fwd") == 1.0 + 32 * 0.5
    assert paper_plan.per_token(t, "x fwd+bwd") == 3.0 + 32 * 1.5
