"""The layers a fused layer can sit on: nn.Linear, transformers' Conv1D, bitsandbytes 4/8-bit.

A fused layer asks three things of its base layer: its shape (D, O), whether its output
is exactly F.linear(x, weight, bias) (then the fast path may join its weight to the
experts' GEMM), and the dtype the experts compute in beside it.
- nn.Linear (and subclasses with a full floating weight (O, D), whatever their forward:
  the base output always comes from the layer itself) and Conv1D (weight (D, O)).
- bitsandbytes Linear4bit / Linear8bitLt (QLoRA bases): the weight is packed, so the
  shape comes from in_features / out_features; the base output comes from the quantized
  module, the experts run beside it in its compute dtype. There is no full-precision
  weight to merge into: `base_shape`, the merge's view of a layer, refuses them.
Anything else is refused by name and type. bitsandbytes is recognised by its classes'
module and name and never imported here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorafuse.errors import LorafuseError

QUANTIZED = {"Linear4bit": "4-bit", "Linear8bitLt": "8-bit"}  # bitsandbytes class -> kind
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# nn.Linear subclasses whose forward is F.linear written out (the joint GEMM equals it)
LINEAR_EQUIVALENT = {"transformers.models.falcon.modeling_falcon.FalconLinear"}


def quantization(module: nn.Module) -> str | None:
    """'4-bit' or '8-bit' for a bitsandbytes quantized linear layer (or a subclass), else None."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes") and cls.__name__ in QUANTIZED:
            return QUANTIZED[cls.__name__]
    return None


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is a transformers Conv1D (GPT-2; weight stored (D, O))."""
    return type(module).__name__ == "Conv1D"


def layer_shape(base: nn.Module, name: str = "") -> tuple[int, int]:
    """(D, O) of a layer a fused layer can sit on (see the module doc).

    Raises LorafuseError naming the module `name` and its type for any other layer (an
    unknown quantized layer, a PEFT layer, an embedding, ...).
    """
    if quantization(base):
        return base.in_features, base.out_features
    w = _full_weight(base)
    if w is not None and isinstance(base, nn.Linear):
        if tuple(w.shape) == (base.out_features, base.in_features):
            return w.shape[1], w.shape[0]
    elif w is not None and is_conv1d(base):
        return w.shape[0], w.shape[1]
    raise LorafuseError(_refusal(base, name))


def base_shape(base: nn.Module) -> tuple[int, int]:
    """(D, O) of an nn.Linear or Conv1D with a full floating weight (what a merge adds to).

    Raises LorafuseError for a bitsandbytes 4-bit / 8-bit layer (no full-precision weight:
    merging would dequantize the model) and for any layer `layer_shape` refuses.
    """
    kind = quantization(base)
    if kind:
        raise LorafuseError(
            f"a bitsandbytes {kind} layer ({type(base).__name__}) has no full-precision weight "
            "to merge into; export the merged experts as a PEFT adapter (lorafuse merge "
            "without --base) and load it on the quantized model, or merge into the "
            "unquantized base model"
        )
    return layer_shape(base)


def joins_gemm(base: nn.Module) -> bool:
    """Whether base(x) is exactly F.linear(x, weight, bias) with a full floating weight."""
    if quantization(base) or _full_weight(base) is None or not isinstance(base, nn.Linear):
        return False
    cls = type(base)
    return cls.forward is nn.Linear.forward or f"{cls.__module__}.{cls.__name__}" in (
        LINEAR_EQUIVALENT
    )


def compute_dtype(base: nn.Module, fallback: torch.dtype | None = None) -> torch.dtype:
    """The dtype the experts compute in beside `base`.

    A full floating weight's dtype; for a quantized layer its compute dtype (bitsandbytes'
    `compute_dtype`, set for 4-bit layers), else `fallback` (the model's activations),
    else float32.
    """
    w = _full_weight(base)
    if w is not None:
        return w.dtype
    dtype = getattr(base, "compute_dtype", None)
    if isinstance(dtype, torch.dtype) and dtype in FLOAT_DTYPES:
        return dtype
    return fallback if fallback is not None else torch.float32


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """module path -> '4-bit' / '8-bit' for every bitsandbytes quantized layer of `model`."""
    return {n: k for n, m in model.named_modules() if (k := quantization(m))}


def _full_weight(base: nn.Module) -> Tensor | None:
    # the layer's 2-D weight if it is a plain floating tensor (not packed, not quantized)
    w = getattr(base, "weight", None)
    if isinstance(w, Tensor) and w.dim() == 2 and w.dtype in FLOAT_DTYPES:
        return w
    return None


def _refusal(base: nn.Module, name: str) -> str:
    cls = type(base)
    w = getattr(base, "weight", None)
    held = f" with a {w.dtype} weight of shape {tuple(w.shape)}" if isinstance(w, Tensor) else ""
    hint = ""
    if hasattr(base, "base_layer") and hasattr(base, "lora_A"):
        hint = "; the model holds PEFT LoRA layers: merge_and_unload() or unload() them first"
    elif (isinstance(w, Tensor) and w.dtype not in FLOAT_DTYPES) or (
        w is None and hasattr(base, "in_features")
    ):
        hint = (
            "; it looks like a quantized layer lorafuse does not know: load the base model "
            "unquantized or with bitsandbytes (pip install 'lorafuse[quantized]')"
        )
    return (
        f"module {name or '?'} is a {cls.__module__}.{cls.__qualname__}{held}; lorafuse fuses "
        f"experts into nn.Linear, transformers' Conv1D and bitsandbytes Linear4bit / "
        f"Linear8bitLt layers only{hint}"
    )
