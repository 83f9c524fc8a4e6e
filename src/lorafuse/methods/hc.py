"""route-hc and route-arrow-hc: routing over merged clusters of the experts (Section 5.3).

The experts are clustered by MBC (no retraining); the fit jointly learns, per fused
layer, the within-cluster merge weights and a per-token router over the merged cluster
experts (the shared loop, through fused_sgd). route-arrow-hc starts the routers from the
Arrow prototypes of the uniformly merged cluster experts.
"""

from __future__ import annotations

from contextlib import ExitStack
from functools import partial

import torch
from pydantic import Field

from lorafuse.errors import LorafuseError
from lorafuse.formats.fits import fit_output, load_fit
from lorafuse.io import atomic_file
from lorafuse.methods.fused_sgd import FusedOptions, fit_fused
from lorafuse.methods.method import Context, Cost, Fitted, Method, Prepared
from lorafuse.mixers.hierarchical import build_hc_routers
from lorafuse.model import attached
from lorafuse.parallel import once


class HCOptions(FusedOptions):
    """The fused fit's options and the number of clusters."""

    clusters: int | None = Field(
        None, ge=1, description="MBC clusters C of the experts (null: the default for N)"
    )


def _params(routers) -> dict[str, torch.nn.Parameter]:
    return {f"{m}::{n}": p for m, r in routers.items() for n, p in r.named_parameters()}


def _hc_mixers(library, device, labels, arrow_init: bool):
    routers = build_hc_routers(library, device, labels, arrow_init)
    return routers, _params(routers)


def fit_hc(ctx: Context, arrow_init: bool) -> Fitted:
    """Cluster the experts, then learn merge weights and routers; save the state."""
    from lorafuse.select.clustering import default_clusters, mbc_cluster

    lib, options = ctx.library, ctx.options
    C = int(options.clusters or default_clusters(len(lib)))
    if not 1 <= C <= len(lib):
        raise LorafuseError(f"{ctx.name} needs 1 <= clusters <= {len(lib)}; got {C}")
    labels = torch.as_tensor(mbc_cluster(lib, k=C, seed=options.seed).labels)
    make = partial(_hc_mixers, labels=labels, arrow_init=arrow_init)
    with fit_fused(ctx, make) as fit:
        state = {n: p.detach().cpu().contiguous() for n, p in _params(fit.mixers).items()}
    out = fit_output(ctx.ws, ctx.name, ctx.kind, ".safetensors")
    once(lambda: _save_state(state, out))  # the main process writes
    summary = {"clusters": C, "experts_order": lib.names, **fit.summary()}
    detail = {"state": str(out), "labels": labels.tolist(), "arrow_init": arrow_init}
    return Fitted(summary, {**detail, **fit.detail()})


def _save_state(state: dict[str, torch.Tensor], out) -> None:
    from safetensors.torch import save_file

    with atomic_file(out) as tmp:
        save_file(state, str(tmp))


def prepare_hc(ctx: Context) -> Prepared:
    """The fitted cluster routers and within-cluster merge weights."""
    from safetensors.torch import load_file

    ws, lib = ctx.ws, ctx.library
    fit = load_fit(ws, ctx.name, ctx.kind, need=("labels", "arrow_init", "state", "clusters"))
    routers = build_hc_routers(lib, ws.device, torch.tensor(fit["labels"]), fit["arrow_init"])
    state = load_file(fit["state"])
    with torch.no_grad():
        for n, p in _params(routers).items():
            p.copy_(state[n])
    with ExitStack() as stack:
        fusion = stack.enter_context(attached(ws.model, lib, "factors"))
        fusion.set_mixers(routers)
        info = {"experts": ctx.kind, "clusters": fit["clusters"], "lr": fit.get("lr")}
        return Prepared(lambda b: ws.logits(b.tensors), stack.pop_all().close, info=info)


_HC = "per-token routing over MBC clusters of the experts merged with learned weights"
CLUSTERED = Cost(experts="clusters", router="clusters")
METHODS = (
    Method(
        "route-hc",
        "routing",
        _HC,
        prepare_hc,
        options=HCOptions,
        fit=partial(fit_hc, arrow_init=False),
        cost=CLUSTERED,
        paper=("fig2",),
        study_experts="private",
    ),
    Method(
        "route-arrow-hc",
        "routing",
        _HC + " (routers started from Arrow)",
        prepare_hc,
        options=HCOptions,
        fit=partial(fit_hc, arrow_init=True),
        cost=CLUSTERED,
        paper=("fig2",),
        study_experts="private",
    ),
)
