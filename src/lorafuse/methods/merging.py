"""Merging weights learned by SGD through the frozen model (paper Section 4.3).

- merge-sgd-global: one l = softmax(theta) (N,) shared by every fused layer.
- merge-sgd-layer: one l per fused layer.
Both merge the factors (the paper's A* = sum l_i A_i, B* = sum l_i s_i B_i), are trained
with the shared loop on data of all tasks without task ids (lr chosen on validation),
and are exported as one merged PEFT adapter under the fits folder. The fit JSON stores
the weights per layer (`weights`: module -> (N,)); evaluation applies them as fixed
coefficients in the fused layer, which is exactly the exported adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorafuse.errors import LorafuseError
from lorafuse.formats.fits import load_fit
from lorafuse.merge import merge, save_adapter
from lorafuse.methods.fused_sgd import fit_fused, is_main_process
from lorafuse.methods.registry import Method, Prepared, register
from lorafuse.mixers.static import Learned
from lorafuse.model import attach

SPACE = "factors"


def adapter_dir(ws, name: str, kind: str) -> Path:
    """Where the merged PEFT adapter of fit `name` over the `kind` experts is saved."""
    return Path(ws.fits_dir) / f"{name}__{kind}"


def _make_mixers(layerwise: bool):
    def make(fusion):
        N = fusion.num_experts
        device = next(iter(fusion.layers.values())).A_cat.device
        if layerwise:
            mixers = {m: Learned(N).to(device) for m in fusion.layers}
            fusion.set_mixers(mixers)
            return mixers, {f"{m}.logits": mix.logits for m, mix in mixers.items()}
        shared = Learned(N).to(device)
        fusion.set_mixer(shared)
        return shared, {"logits": shared.logits}

    return make


def fit_merge(ws, kind: str, name: str, layerwise: bool, options: dict[str, Any]) -> dict:
    """Learn global or per-layer merge weights; save the merged adapter; return the fit."""
    fit = fit_fused(ws, kind, name, _make_mixers(layerwise), options, SPACE)
    try:
        lib = fit.fusion.library
        if layerwise:
            weights = {m: mix.weights().detach().cpu() for m, mix in fit.mixers.items()}
        else:
            weights = dict.fromkeys(fit.fusion.layers, fit.mixers.weights().detach().cpu())
    finally:
        fit.fusion.detach()
    merged = merge(lib, weights if layerwise else next(iter(weights.values())), SPACE)
    merged.meta["method"] = name
    out = adapter_dir(ws, name, kind)
    if is_main_process():  # under accelerate launch: one writer
        save_adapter(merged, out, force=True)
    payload = {
        "weights": {m: w.tolist() for m, w in weights.items()},
        "experts_order": lib.names,
        "space": SPACE,
        "adapter": str(out),
        **fit.payload(),
    }
    if not layerwise:
        payload["global_weights"] = next(iter(weights.values())).tolist()
    return payload


def prepare_merge_sgd(name: str):
    """prepare(ws, kind, arg): the fitted weights as fixed per-layer coefficients."""

    def prepare(ws, kind, arg) -> Prepared:
        fit = load_fit(ws, name, kind)
        lib = ws.library(kind)
        fusion = attach(ws.model, lib, fit.get("space", SPACE))
        try:
            fusion.set_coefficients({m: torch.tensor(w) for m, w in fit["weights"].items()})
        except LorafuseError:
            fusion.detach()
            raise

        info = {"experts": kind, "lr": fit.get("lr")}
        return Prepared(lambda b: ws.logits(b.tensors), fusion.detach, info=info)

    return prepare


for _name, _layerwise, _what in (
    ("merge-sgd-global", False, "one softmax weight vector shared by all layers"),
    ("merge-sgd-layer", True, "one softmax weight vector per layer"),
):
    register(
        Method(
            _name,
            "merging",
            f"{_what}, learned by SGD through the frozen model (factors merged)",
            prepare_merge_sgd(_name),
            fit=lambda ws, kind, arg, options, n=_name, lw=_layerwise: fit_merge(
                ws, kind, n, lw, options
            ),
        )
    )
