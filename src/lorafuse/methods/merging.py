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

from contextlib import ExitStack
from functools import partial
from pathlib import Path

import torch

from lorafuse.formats.fits import fit_output, load_fit
from lorafuse.merge import merge, save_adapter
from lorafuse.methods.fused_sgd import FusedOptions, fit_fused
from lorafuse.methods.method import Context, Cost, Fitted, Method, Prepared
from lorafuse.mixers.static import Learned
from lorafuse.model import attached
from lorafuse.parallel import once

SPACE = "factors"


def adapter_dir(ws, name: str, kind: str) -> Path:
    """Where the merged PEFT adapter of fit `name` over the `kind` experts is saved."""
    return fit_output(ws, name, kind)


def global_mixer(library, device):
    """make_mixers for `fit_fused`: one softmax weight vector shared by every layer."""
    shared = Learned(len(library)).to(device)
    return shared, {"logits": shared.logits}


def layer_mixers(library, device):
    """make_mixers for `fit_fused`: one softmax weight vector per fused layer."""
    mixers = {m: Learned(len(library)).to(device) for m in library.modules}
    return mixers, {f"{m}.logits": mix.logits for m, mix in mixers.items()}


def fit_merge(ctx: Context, layerwise: bool) -> Fitted:
    """Learn global or per-layer merge weights; save the merged adapter; return the fit."""
    make = layer_mixers if layerwise else global_mixer
    with fit_fused(ctx, make, SPACE) as fit:
        lib = fit.fusion.library
        if layerwise:
            weights = {m: mix.weights().detach().cpu() for m, mix in fit.mixers.items()}
        else:
            weights = dict.fromkeys(fit.fusion.layers, fit.mixers.weights().detach().cpu())
    merged = merge(lib, weights if layerwise else next(iter(weights.values())), SPACE)
    merged.meta["method"] = ctx.name
    out = adapter_dir(ctx.ws, ctx.name, ctx.kind)
    once(lambda: save_adapter(merged, out, force=True))  # the main process writes
    summary = {
        "weights": {m: w.tolist() for m, w in weights.items()},
        "experts_order": lib.names,
        "adapter": str(out),
        **fit.summary(),
    }
    detail = {"space": SPACE, **fit.detail()}
    if not layerwise:
        detail["global_weights"] = next(iter(weights.values())).tolist()
    return Fitted(summary, detail)


def prepare_merge_sgd(ctx: Context) -> Prepared:
    """The fitted weights as fixed per-layer coefficients."""
    ws = ctx.ws
    fit = load_fit(ws, ctx.name, ctx.kind, need=("weights",))
    with ExitStack() as stack:
        fusion = stack.enter_context(attached(ws.model, ctx.library, fit.get("space", SPACE)))
        fusion.set_coefficients({m: torch.tensor(w) for m, w in fit["weights"].items()})
        info = {"experts": ctx.kind, "lr": fit.get("lr")}
        return Prepared(lambda b: ws.logits(b.tensors), stack.pop_all().close, info=info)


_LEARNED = "learned by SGD through the frozen model (factors merged)"
METHODS = (
    Method(
        "merge-sgd-global",
        "merging",
        f"one softmax weight vector shared by all layers, {_LEARNED}",
        prepare_merge_sgd,
        options=FusedOptions,
        fit=partial(fit_merge, layerwise=False),
        cost=Cost(experts=0, folded=True),
        paper=("fig2",),
    ),
    Method(
        "merge-sgd-layer",
        "merging",
        f"one softmax weight vector per layer, {_LEARNED}",
        prepare_merge_sgd,
        options=FusedOptions,
        fit=partial(fit_merge, layerwise=True),
        cost=Cost(experts=0, folded=True),
        paper=("fig2",),
    ),
)
