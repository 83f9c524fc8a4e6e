"""What a fused layer sits on (lorafuse.base_layers), without bitsandbytes.

Layers lorafuse cannot fuse into are refused by module path and type (not an
AttributeError or a misleading shape mismatch); an nn.Linear subclass with a forward of
its own keeps it (the fast path's joint GEMM would skip it); merging refuses a layer
without a full-precision weight. The bitsandbytes layers themselves: tests/test_quantized.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafuse.base_layers import base_shape, compute_dtype, joins_gemm, layer_shape
from lorafuse.errors import LorafuseError
from lorafuse.fast import choose
from lorafuse.layer import FusedLoRALinear
from lorafuse.library import ExpertLibrary
from lorafuse.model import attach, is_quantized
from tests.conftest import load_base

Q_PROJ = "model.layers.0.self_attn.q_proj"


class Int8Linear(nn.Linear):
    """A quantized Linear lorafuse does not know: int8 weight, scales, its own forward."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        w = linear.weight.detach()
        self.scale = w.abs().amax(1, keepdim=True) / 127  # (O, 1)
        self.weight = nn.Parameter((w / self.scale).round().to(torch.int8), requires_grad=False)

    def forward(self, x):
        return x @ (self.weight.float() * self.scale).T


class PackedLinear(nn.Module):
    """A GPTQ-like layer: packed `qweight`, no `weight` at all."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.zeros(linear.in_features // 8, linear.out_features))


class DoubledLinear(nn.Linear):
    """An nn.Linear subclass with a forward of its own (as Ergo's, Idefics' ...)."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    "wrap, match",
    [
        (Int8Linear, r"Int8Linear with a torch.int8 weight .*quantized layer lorafuse does not"),
        (PackedLinear, r"PackedLinear; .*quantized layer lorafuse does not know"),
        (lambda lin: nn.Embedding(4, 4), r"Embedding with a torch.float32 weight .*only$"),
    ],
)
def test_layers_lorafuse_cannot_fuse_are_named(llama_dir, llama_experts, wrap, match):
    model = load_base(llama_dir)
    attn = model.get_submodule(Q_PROJ.rsplit(".", 1)[0])
    attn.q_proj = wrap(attn.q_proj)
    with pytest.raises(LorafuseError, match=f"module {Q_PROJ} is a .*{match}"):
        attach(model, ExpertLibrary.load(llama_experts))
    assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())  # nothing swapped
    assert not is_quantized(model)  # not a bitsandbytes layer


def test_a_peft_model_is_refused_with_the_fix(llama_dir, llama_experts):
    from peft import PeftModel

    peft = PeftModel.from_pretrained(load_base(llama_dir), llama_experts[0])
    with pytest.raises(LorafuseError, match=r"LoRA layers: merge_and_unload\(\) or unload\(\)"):
        layer_shape(peft.get_submodule(f"base_model.model.{Q_PROJ}"), Q_PROJ)


def test_a_linear_subclass_keeps_its_own_forward(llama_dir, llama_experts):
    lib = ExpertLibrary.load(llama_experts)
    stacked = lib.modules[Q_PROJ]
    base = load_base(llama_dir).get_submodule(Q_PROJ)
    doubled = DoubledLinear(base.in_features, base.out_features, bias=False)
    doubled.weight.data.copy_(base.weight)
    assert joins_gemm(base) and not joins_gemm(doubled)
    x = torch.randn(2, 5, base.in_features)  # (B, T, D)
    for fast in (True, False):
        layer = FusedLoRALinear(
            doubled, stacked, "factors", Q_PROJ, planner=choose if fast else None
        )
        layer.mixer = lambda x: torch.tensor([1.0, 0, 0, 0])
        with torch.no_grad():
            y = layer(x)  # (B, T, O)
        A, B, s = stacked.A[0], stacked.B[0], stacked.scale[0]
        expected = 2 * base(x) + s * (x @ A.T) @ B.T  # the subclass's output + expert 0
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_falcon_linear_joins_the_gemm():
    from transformers.models.falcon.modeling_falcon import FalconLinear

    assert joins_gemm(FalconLinear(8, 4, bias=False))  # its forward is F.linear written out


def test_shapes_and_dtypes_of_full_precision_layers():
    from transformers.pytorch_utils import Conv1D

    lin, conv = nn.Linear(8, 4).to(torch.bfloat16), Conv1D(4, 8)  # Conv1D(nf=O, nx=D)
    assert layer_shape(lin) == base_shape(lin) == (8, 4)
    assert layer_shape(conv) == base_shape(conv) == (8, 4)
    assert compute_dtype(lin, torch.float16) == torch.bfloat16  # the weight's, always
    assert not joins_gemm(conv)
    with pytest.raises(LorafuseError, match="Int8Linear"):
        base_shape(Int8Linear(nn.Linear(8, 4)))  # never merged into an int8 weight
