"""Routing methods: SGD-learned per-token routers (paper 4.4) and Arrow (2.4, B.1, B.4).

- route-sgd: per fused layer a linear router softmax(W x + b) from that layer's input,
  per token, trained by the shared loop on data of all tasks without task ids (zero
  init = uniform start). route-sgd-arrow: the same, started from dense Arrow. Trained
  dense; `-top1/-top2/-top4` evaluate the same fit keeping the k largest coefficients
  renormalised (B.4). The fit saves a routed model folder (routed.py) under the fits.
- arrow, arrow-top1/2/4: zero-shot, prototypes = top right singular vectors of the
  experts, top-k softmax of |x . v_i| / temperature. Mixing in the `factors` space (the
  paper, mttl); `arrow-with:k=4,space=deltas,temperature=0.5` picks PEFT's `deltas`
  space and another temperature.
A top-k above the number of experts is clamped to N (recorded as `top_k` in the info).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafuse.errors import LorafuseError
from lorafuse.evaluate import Result, standard_error
from lorafuse.formats.fits import load_fit
from lorafuse.formats.routed import load_routed, save_routed
from lorafuse.layer import check_space
from lorafuse.methods.fused_sgd import fit_fused, is_main_process
from lorafuse.methods.registry import Method, Prepared, register
from lorafuse.mixers.routers import build_routers, router_parameters
from lorafuse.model import attach

SPACE = "factors"
TOP_KS = (1, 2, 4)


def routed_dir(ws, name: str, kind: str) -> Path:
    """Where the routed model of fit `name` over the `kind` experts is saved."""
    return Path(ws.fits_dir) / f"{name}__{kind}"


def route_sgd_mixers(init: str = "uniform", temperature: float = 1.0):
    """make_mixers(fusion) for `fit_fused`: fresh linear routers on every fused layer."""

    def make(fusion):
        routers = build_routers(fusion, "linear", init=init, temperature=temperature)
        return routers, router_parameters(routers)

    return make


def fit_route_sgd(ws, kind: str, name: str, init: str, options: dict[str, Any]) -> dict:
    """Train per-layer linear routers; save the routed model; return the fit."""
    space = check_space(options.get("space", SPACE))
    temperature = float(options.get("temperature", 1.0))
    fit = fit_fused(ws, kind, name, route_sgd_mixers(init, temperature), options, space)
    try:
        settings = {"method": name, "init": init, "lr": fit.lr, "steps": fit.result.steps}
        out = routed_dir(ws, name, kind)
        if is_main_process():  # under accelerate launch: one writer
            save_routed(fit.fusion, out, settings, force=True)
        n_params = sum(p.numel() for p in router_parameters(fit.mixers).values())
        names = fit.fusion.library.names
    finally:
        fit.fusion.detach()
    return {
        "routed": str(out),
        "experts_order": names,
        "space": space,
        "init": init,
        "router_parameters": int(n_params),
        **fit.payload(),
    }


def prepare_route_sgd(name: str, top_k: int | None):
    """prepare(ws, kind, arg): the routed model of fit `name`, dense or top-k."""

    def prepare(ws, kind, arg) -> Prepared:
        fit = load_fit(ws, name, kind)
        lib = ws.library(kind)
        k = _clamp(top_k, len(lib))
        fusion = load_routed(ws.model, fit["routed"], library=lib, top_k=k)
        info = {"experts": kind, "top_k": k, "init": fit.get("init"), "lr": fit.get("lr")}
        return Prepared(_forward(ws), fusion.detach, info=info)

    return prepare


def arrow_prepared(
    ws, kind: str, top_k: int | None = None, space: str = SPACE, temperature: float = 1.0
) -> Prepared:
    """Arrow routing over the `kind` experts (top_k None: all experts).

    Raises LorafuseError for an unknown space or a temperature <= 0.
    """
    lib = ws.library(kind)
    k = _clamp(top_k, len(lib))
    fusion = attach(ws.model, lib, check_space(space))
    try:
        build_routers(fusion, "arrow", top_k=k, temperature=temperature)
    except LorafuseError:
        fusion.detach()
        raise
    info = {"experts": kind, "top_k": k, "space": space, "temperature": temperature}
    return Prepared(_forward(ws), fusion.detach, info=info)


def parse_arrow_arg(arg: str) -> dict[str, Any]:
    """`k=4,space=deltas,temperature=0.5` -> arrow_prepared keywords; LorafuseError if bad."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in arg.split(","))):
        key, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            if key == "k":
                out["top_k"] = None if value in ("all", "") else int(value)
            elif key == "space":
                out["space"] = check_space(value)
            elif key == "temperature":
                out["temperature"] = float(value)
            else:
                raise ValueError
        except ValueError:
            raise LorafuseError(
                f"bad arrow-with setting {part!r}; use k=<int|all>, space=factors|deltas, "
                "temperature=<float>, e.g. arrow-with:k=4,space=deltas,temperature=0.5"
            ) from None
    return out


def topk_gap(top1: Result, topk: Result) -> dict[str, float]:
    """B.4's calibration gap: top-1 minus top-k mean test loss, with the paired se over tasks.

    Raises LorafuseError when the two results cover different tasks.
    """
    if set(top1.per_task) != set(topk.per_task):
        raise LorafuseError(f"{top1.method} and {topk.method} cover different tasks")
    diff = [top1.per_task[t]["loss"] - topk.per_task[t]["loss"] for t in sorted(top1.per_task)]
    return {"gap": sum(diff) / len(diff), "se": standard_error(diff), "n_tasks": len(diff)}


def _forward(ws):
    return lambda batch: ws.logits(batch.tensors)


def _clamp(k: int | None, n: int) -> int | None:
    return None if k is None else min(int(k), n)


for _name, _init in (("route-sgd", "uniform"), ("route-sgd-arrow", "arrow")):
    _start = "uniform coefficients" if _init == "uniform" else "dense Arrow"
    register(
        Method(
            _name,
            "routing",
            f"per-token linear routers per layer learned by SGD, started from {_start}",
            prepare_route_sgd(_name, None),
            fit=lambda ws, kind, arg, options, n=_name, i=_init: fit_route_sgd(
                ws, kind, n, i, options
            ),
        )
    )
    for _k in TOP_KS:
        register(
            Method(
                f"{_name}-top{_k}",
                "routing",
                f"the {_name} fit keeping the top {_k} coefficients per token (renormalised)",
                prepare_route_sgd(_name, _k),
                fitted_by=_name,
            )
        )
register(
    Method(
        "arrow",
        "routing",
        "Arrow: zero-shot softmax of |x . v_i| over all experts",
        lambda ws, kind, arg: arrow_prepared(ws, kind),
    )
)
for _k in TOP_KS:
    register(
        Method(
            f"arrow-top{_k}",
            "routing",
            f"Arrow keeping the top {_k} experts per token (factors space, temperature 1)",
            lambda ws, kind, arg, k=_k: arrow_prepared(ws, kind, k),
        )
    )
register(
    Method(
        "arrow-with",
        "routing",
        "Arrow with settings: arrow-with:k=4,space=deltas,temperature=0.5",
        lambda ws, kind, arg: arrow_prepared(ws, kind, **parse_arrow_arg(arg)),
        needs_arg=True,
    )
)
