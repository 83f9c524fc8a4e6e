"""Helpers of the delta-merge tests: each expert's dense delta, PEFT's merged deltas."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch
from torch import Tensor

from lorafuse.library import ExpertLibrary
from lorafuse.merge import MergedAdapter
from tests.conftest import load_base


def stacked_deltas(lib: ExpertLibrary, module: str) -> Tensor:
    """Every expert's s_i B_i A_i (N, O, D), written out from the library's factors."""
    mod = lib.modules[module]
    out = []
    for i, r in enumerate(mod.rank.tolist()):
        out.append(mod.B[i, :, :r] @ mod.A[i, :r] * mod.scale[i])  # (O, D)
    return torch.stack(out)  # (N, O, D)


def products(merged: MergedAdapter) -> dict[str, Tensor]:
    """Each module's merged delta B @ A (O, D) of an exported adapter (scaling 1)."""
    return {name: B @ A for name, (A, B) in merged.modules.items()}


def peft_model(base_dir: Path, expert_dirs: list[Path]):
    """A PeftModel holding the experts as adapters e0, e1, ..."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base_dir), expert_dirs[0], adapter_name="e0")
    for i, d in enumerate(expert_dirs[1:], start=1):
        model.load_adapter(d, adapter_name=f"e{i}")
    return model


def peft_merged(
    model, weights, combination_type: str, adapters=None, before_svd=False, **kw
) -> dict[str, Tensor]:
    """PEFT's add_weighted_adapter result per module as a delta (O, D): B @ A * scaling.

    `before_svd`: for the `_svd` forms, the combined delta PEFT hands to its SVD instead
    (PEFT's svd_rank cannot exceed the smallest module's min(O, D), so its output is
    not exact on modules larger than that).
    """
    from peft.tuners.lora import LoraLayer

    seen: list[Tensor] = []
    real_svd = torch.linalg.svd

    def recording_svd(M, *args, **kwargs):
        seen.append(M.detach().clone())  # (O, D): PEFT transposes Conv1D deltas first
        return real_svd(M, *args, **kwargs)

    names = adapters or [n for n in model.peft_config if n.startswith("e")]
    with mock.patch.object(torch.linalg, "svd", recording_svd):
        model.add_weighted_adapter(names, list(weights), "merged", combination_type, **kw)
    out = {}
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and "merged" in layer.lora_A:
            dW = layer.get_delta_weight("merged").detach()
            out[name] = dW.T if layer.fan_in_fan_out else dW  # (O, D)
    model.delete_adapter("merged")
    if before_svd:
        assert len(seen) == len(out)  # one SVD per module, in named_modules order
        out = dict(zip(out, seen))
    return out


def assert_deltas_close(ours: dict[str, Tensor], ref: dict[str, Tensor], rtol=1e-4) -> None:
    """Same modules, and each delta equal up to fp32 SVD rounding (relative to its size)."""
    assert set(ours) == set(ref)
    for name, r in ref.items():
        atol = 1e-5 * float(r.abs().max()) + 1e-7
        torch.testing.assert_close(ours[name], r.float(), atol=atol, rtol=rtol, msg=name)
