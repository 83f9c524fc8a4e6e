"""route-hc and route-arrow-hc: routing over merged clusters of the experts (Section 5.3).

The experts are clustered by MBC (no retraining); the fit jointly learns, per fused
layer, the within-cluster merge weights and a per-token router over the merged cluster
experts (the shared loop, through fused_sgd). route-arrow-hc starts the routers from the
Arrow prototypes of the uniformly merged cluster experts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorafuse.errors import LorafuseError
from lorafuse.formats.fits import load_fit
from lorafuse.methods.fused_sgd import fit_fused, is_main_process
from lorafuse.methods.registry import Method, Prepared, register
from lorafuse.mixers.hierarchical import build_hc_routers
from lorafuse.model import attach


def default_clusters(n_experts: int) -> int:
    """About four experts per cluster, at most 10 (the paper's MBC count)."""
    return max(1, min(10, round(n_experts / 4)))


def _params(routers) -> dict[str, torch.nn.Parameter]:
    return {f"{m}::{n}": p for m, r in routers.items() for n, p in r.named_parameters()}


def fit_hc(ws, kind: str, name: str, arrow_init: bool, options: dict[str, Any]) -> dict:
    """Cluster the experts, then learn merge weights and routers; save the state."""
    from safetensors.torch import save_file

    from lorafuse.select.clustering import mbc_cluster

    lib = ws.library(kind)
    k = int(options.get("clusters") or default_clusters(len(lib)))
    if not 1 <= k <= len(lib):
        raise LorafuseError(f"route-hc needs 1 <= clusters <= {len(lib)}; got {k}")
    labels = torch.as_tensor(mbc_cluster(lib, k=k, seed=options.get("seed", 0)).labels)

    def make(fusion):
        routers = build_hc_routers(fusion, labels, arrow_init)
        return routers, _params(routers)

    fit = fit_fused(ws, kind, name, make, options)
    try:
        state = {n: p.detach().cpu().contiguous() for n, p in _params(fit.mixers).items()}
    finally:
        fit.fusion.detach()
    out = Path(ws.fits_dir) / f"{name}__{kind}.safetensors"
    if is_main_process():
        tmp = out.with_suffix(".tmp")
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(tmp))
        tmp.replace(out)
    return {
        "state": str(out),
        "labels": labels.tolist(),
        "clusters": k,
        "experts_order": lib.names,
        "arrow_init": arrow_init,
        **fit.payload(),
    }


def prepare_hc(name: str):
    def prepare(ws, kind, arg) -> Prepared:
        from safetensors.torch import load_file

        fit = load_fit(ws, name, kind)
        lib = ws.library(kind)
        fusion = attach(ws.model, lib, "factors")
        routers = build_hc_routers(fusion, torch.tensor(fit["labels"]), fit["arrow_init"])
        state = load_file(fit["state"])
        with torch.no_grad():
            for n, p in _params(routers).items():
                p.copy_(state[n])
        info = {"experts": kind, "clusters": fit["clusters"], "lr": fit.get("lr")}
        return Prepared(lambda b: ws.logits(b.tensors), fusion.detach, info=info)

    return prepare


for _name, _arrow in (("route-hc", False), ("route-arrow-hc", True)):
    register(
        Method(
            _name,
            "routing",
            "per-token routing over MBC clusters of the experts merged with learned weights"
            + (" (routers started from Arrow)" if _arrow else ""),
            prepare_hc(_name),
            fit=lambda ws, kind, arg, options, n=_name, a=_arrow: fit_hc(ws, kind, n, a, options),
        )
    )
