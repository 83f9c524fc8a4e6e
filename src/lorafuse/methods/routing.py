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

from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lorafuse.errors import LorafuseError
from lorafuse.evaluate import Result, standard_error
from lorafuse.formats.fits import fit_output, load_fit
from lorafuse.layer import check_space
from lorafuse.methods.fused_sgd import FusedOptions, fit_fused
from lorafuse.methods.method import Context, Cost, Fitted, Method, Prepared
from lorafuse.mixers.routers import build_routers, router_parameters
from lorafuse.model import attached
from lorafuse.parallel import once
from lorafuse.routed import load_routed, save_routed

SPACE = "factors"
TOP_KS = (1, 2, 4)
ROUTED = Cost(experts="top_k", router="experts")  # router + the top-k (or all) experts


class RouteOptions(FusedOptions):
    """The fused fit's options and the routers' space and temperature."""

    space: Literal["factors", "deltas"] = Field(SPACE, description="mixing space")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the routers")


def routed_dir(ws, name: str, kind: str) -> Path:
    """Where the routed model of fit `name` over the `kind` experts is saved."""
    return fit_output(ws, name, kind)


def route_sgd_mixers(init: str = "uniform", temperature: float = 1.0):
    """make_mixers(library, device) for `fit_fused`: fresh linear routers on every module."""
    return partial(_linear_routers, init=init, temperature=temperature)


def _linear_routers(library, device, init: str, temperature: float):
    routers = build_routers(library, device, "linear", init=init, temperature=temperature)
    return routers, router_parameters(routers)


def fit_route_sgd(ctx: Context, init: str) -> Fitted:
    """Train per-layer linear routers; save the routed model; return the fit."""
    options = ctx.options
    space = check_space(options.space)
    with fit_fused(ctx, route_sgd_mixers(init, options.temperature), space) as fit:
        settings = {"method": ctx.name, "init": init, "lr": fit.lr, "steps": fit.result.steps}
        out = routed_dir(ctx.ws, ctx.name, ctx.kind)
        once(lambda: save_routed(fit.fusion, out, settings, force=True))  # main writes
        n_params = sum(p.numel() for p in router_parameters(fit.mixers).values())
        names = fit.fusion.library.names
    summary = {"routed": str(out), "experts_order": names, **fit.summary()}
    detail = {"space": space, "init": init, "router_parameters": int(n_params), **fit.detail()}
    return Fitted(summary, detail)


def prepare_route_sgd(ctx: Context, fit_name: str, top_k: int | None) -> Prepared:
    """The routed model of fit `fit_name`, dense or top-k."""
    ws, lib = ctx.ws, ctx.library
    fit = load_fit(ws, fit_name, ctx.kind, need=("routed",))
    k = _clamp(top_k, len(lib))
    fusion = load_routed(ws.model, fit["routed"], library=lib, top_k=k)
    info = {"experts": ctx.kind, "top_k": k, "init": fit.get("init"), "lr": fit.get("lr")}
    return Prepared(_forward(ws), fusion.detach, info=info)


def arrow_prepared(
    ctx: Context, top_k: int | None = None, space: str = SPACE, temperature: float = 1.0
) -> Prepared:
    """Arrow routing over the context's experts (top_k None: all experts).

    Raises LorafuseError for an unknown space or a temperature <= 0.
    """
    ws, lib = ctx.ws, ctx.library
    k = _clamp(top_k, len(lib))
    with ExitStack() as stack:
        fusion = stack.enter_context(attached(ws.model, lib, check_space(space)))
        fusion.set_mixers(build_routers(lib, ws.device, "arrow", top_k=k, temperature=temperature))
        info = {"experts": ctx.kind, "top_k": k, "space": space, "temperature": temperature}
        return Prepared(_forward(ws), stack.pop_all().close, info=info)


def prepare_arrow_with(ctx: Context) -> Prepared:
    """Arrow with the settings of the argument (`arrow-with:k=4,space=deltas`)."""
    return arrow_prepared(ctx, **parse_arrow_arg(ctx.arg or ""))


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


def _route_sgd(name: str, init: str, start: str, paper: bool) -> tuple[Method, ...]:
    """route-sgd-like methods: the fitted dense router and its top-k variants (`paper`:
    the dense router is Figure 2's, its top-1 and top-4 variants are B.4's)."""
    dense = Method(
        name,
        "routing",
        f"per-token linear routers per layer learned by SGD, started from {start}",
        partial(prepare_route_sgd, fit_name=name, top_k=None),
        options=RouteOptions,
        fit=partial(fit_route_sgd, init=init),
        cost=ROUTED,
        paper=("fig2", "B.4") if paper else (),
    )
    tops = tuple(
        Method(
            f"{name}-top{k}",
            "routing",
            f"the {name} fit keeping the top {k} coefficients per token (renormalised)",
            partial(prepare_route_sgd, fit_name=name, top_k=k),
            options=RouteOptions,  # passed on to the fit of `name` when it is not listed
            fitted_by=name,
            cost=ROUTED,
            paper=("B.4",) if paper and k in (1, 4) else (),
        )
        for k in TOP_KS
    )
    return (dense, *tops)


def _arrow_top(k: int) -> Method:
    return Method(
        f"arrow-top{k}",
        "baseline",
        f"Arrow keeping the top {k} experts per token (factors space, temperature 1)",
        partial(arrow_prepared, top_k=k),
        cost=ROUTED,
        # The paper's Arrow baseline is top-4 (Figures 2 and 4); B.4 compares top-1 with it.
        paper={1: ("B.4",), 4: ("fig2", "fig4", "B.4")}.get(k, ()),
    )


# Arrow is zero-shot: the study counts it among the baselines (its cost is routing's).
METHODS = (
    *_route_sgd("route-sgd", "uniform", "uniform coefficients", paper=True),
    *_route_sgd("route-sgd-arrow", "arrow", "dense Arrow", paper=False),
    Method(
        "arrow",
        "baseline",
        "Arrow: zero-shot softmax of |x . v_i| over all experts",
        arrow_prepared,
        cost=ROUTED,
    ),
    *(_arrow_top(k) for k in TOP_KS),
    Method(
        "arrow-with",
        "baseline",
        "Arrow with settings: arrow-with:k=4,space=deltas,temperature=0.5",
        prepare_arrow_with,
        cost=ROUTED,
        needs_arg=True,
    ),
)
