"""PEFT's and mergekit's merges of the experts' deltas as study methods (beyond the paper).

Each method merges the full-rank deltas dW_i = s_i B_i A_i with lorafuse.delta_merge
(TIES, DARE, magnitude pruning, breadcrumbs, task arithmetic) and chooses its one
hyper-parameter (density, drop rate or scale) on the validation split from a small grid,
as the SGD fits choose their learning rate: each grid value's merged adapter is attached
and scored on the capped validation subset (the evaluation's metric); the lowest loss wins
(the first on a tie). The winner is saved as a PEFT adapter under the fits folder,
exactly (each module at the rank of its merged delta: min(O, D) for a sparsified merge,
sum_i r_i for task arithmetic), and evaluation attaches that saved adapter: the evaluated
model is the exported one, folded into the weights at no inference cost.

Weights: the TIES-style merges (ties, dare-ties) give every expert w_i = 1, so their
disjoint merge is the mean of the agreeing experts' entries (TIES with lambda = 1; PEFT's
`ties_svd` defaults: sign of the summed deltas, divided by the agreeing count); the linear
ones (dare-linear, magnitude-prune, breadcrumbs) sum with w_i = 1/N, the uniform mean, and
task arithmetic with w_i = lambda / N (lambda = 1 is merge-uniform-full).

`merge-ties-rank:<K>` evaluates merge-ties' fit truncated by SVD to rank K per module and
records the spectral energy kept (worst and mean over modules) in its result's settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field, model_validator

from lorafuse.delta_merge import delta_merge
from lorafuse.errors import LorafuseError
from lorafuse.fit.options import Options
from lorafuse.formats.fits import fit_output, load_fit
from lorafuse.linalg import truncate_product
from lorafuse.merge import MergedAdapter, save_adapter
from lorafuse.methods.fused_sgd import VALIDATION_PER_TASK, validation_loss
from lorafuse.methods.method import Context, Cost, Fitted, Method, Prepared
from lorafuse.model import attached
from lorafuse.parallel import once

Density = Annotated[float, Field(gt=0, le=1)]
Drop = Annotated[float, Field(ge=0, lt=1)]
Scale = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class ChosenOptions(Options):
    """A merge whose hyper-parameter is chosen on the validation split."""

    validation_max_per_task: int | None = Field(
        VALIDATION_PER_TASK, ge=1, description="validation examples per task (null: all)"
    )


class DensityOptions(ChosenOptions):
    """TIES and magnitude pruning: the density (share of each delta kept) is chosen."""

    density_grid: list[Density] = Field(
        [0.1, 0.2, 0.5, 0.8], min_length=1, description="densities tried, in (0, 1]"
    )

    def grid(self) -> list[float]:
        """The values tried, in order."""
        return list(self.density_grid)


class DropOptions(ChosenOptions):
    """DARE: the drop rate is chosen; the masks are drawn from `seed`."""

    drop_grid: list[Drop] = Field(
        [0.1, 0.5, 0.9], min_length=1, description="drop rates tried, in [0, 1)"
    )
    seed: int = Field(0, ge=0, description="seed of DARE's random masks")

    def grid(self) -> list[float]:
        """The values tried, in order."""
        return list(self.drop_grid)


class ScaleOptions(ChosenOptions):
    """Task arithmetic: the scale lambda of the summed deltas (w_i = lambda / N) is chosen."""

    scale_grid: list[Scale] = Field(
        [0.5, 1.0, 2.0, 4.0], min_length=1, description="scales lambda tried (w_i = lambda / N)"
    )

    def grid(self) -> list[float]:
        """The values tried, in order."""
        return list(self.scale_grid)


class BreadcrumbsOptions(DensityOptions):
    """Model Breadcrumbs: the density is chosen, the top `gamma` share is always dropped."""

    density_grid: list[Density] = Field(
        [0.5, 0.8, 0.9], min_length=1, description="densities tried, with density + gamma <= 1"
    )
    gamma: float = Field(0.01, ge=0, lt=1, description="share of largest magnitudes dropped")

    @model_validator(mode="after")
    def _fits(self) -> BreadcrumbsOptions:
        if max(self.density_grid) + self.gamma > 1:
            raise ValueError(
                f"density + gamma must be <= 1; got density {max(self.density_grid)} with "
                f"gamma {self.gamma}"
            )
        return self


# ---- the merges: (library, value, options) -> MergedAdapter, exact -------------------
def _ones(lib) -> torch.Tensor:
    return torch.ones(len(lib))  # (N,): TIES-style disjoint mean


def _mean(lib) -> torch.Tensor:
    return torch.full((len(lib),), 1.0 / len(lib))  # (N,): the uniform linear mean


def _ties(lib, v, o) -> MergedAdapter:
    return delta_merge(lib, "ties", _ones(lib), density=v)


def _dare_ties(lib, v, o) -> MergedAdapter:
    return delta_merge(lib, "dare-ties", _ones(lib), drop=v, seed=o.seed)


def _dare_linear(lib, v, o) -> MergedAdapter:
    return delta_merge(lib, "dare-linear", _mean(lib), drop=v, seed=o.seed)


def _magnitude_prune(lib, v, o) -> MergedAdapter:
    return delta_merge(lib, "magnitude-prune", _mean(lib), density=v)


def _breadcrumbs(lib, v, o) -> MergedAdapter:
    return delta_merge(lib, "breadcrumbs", _mean(lib), density=v, gamma=o.gamma)


def _task_arithmetic(lib, v, o) -> MergedAdapter:
    return delta_merge(lib, "task-arithmetic", v * _mean(lib))


@dataclass(frozen=True)
class Chosen:
    """A delta merge and the name of its hyper-parameter chosen on validation."""

    merge: Callable[[Any, float, Any], MergedAdapter]
    param: str


# ---- fit and evaluation ----------------------------------------------------------------
def fit_delta_merge(ctx: Context, chosen: Chosen) -> Fitted:
    """Merge once per grid value, score each on validation, save the best adapter exactly.

    The fit records the value chosen, every value's validation loss, the weights, the
    exported rank and the seconds. Raises what the merge raises (LorafuseError).
    """
    ws, lib, options = ctx.ws, ctx.library, ctx.options
    start = time.perf_counter()
    validate = validation_loss(ws, options.validation_max_per_task)
    runs, best, best_value, best_loss = [], None, None, float("inf")
    for value in options.grid():
        merged = chosen.merge(lib, value, options)
        with attached(ws.model, merged.as_library(), "factors") as fusion:
            fusion.set_expert(0)
            loss = validate()
        runs.append({chosen.param: value, "validation_loss": loss})
        if loss < best_loss:  # strictly lower: the first value wins a tie
            best, best_value, best_loss = merged, value, loss
    if best is None:
        raise LorafuseError(f"method {ctx.name}: no value of the grid gave a finite "
                            f"validation loss ({runs})")  # fmt: skip
    best.meta["method"] = ctx.name
    out = fit_output(ws, ctx.name, ctx.kind)
    once(lambda: save_adapter(best, out, force=True))  # the main process writes
    summary = {
        chosen.param: best_value,
        "param": chosen.param,
        "validation_loss": best_loss,
        "runs": runs,
        "weights": best.meta["weights"],
        "experts_order": lib.names,
        "rank": best.rank,
        "adapter": str(out),
    }
    detail = {"merge": best.meta, "seconds": round(time.perf_counter() - start, 3)}
    return Fitted(summary, detail)


def prepare_delta_merge(ctx: Context, fit_name: str | None = None) -> Prepared:
    """The fit's saved adapter attached with coefficient 1 (exact); with `fit_name` (a rank
    variant) that method's fit, truncated by SVD to rank `ctx.arg` per module."""
    from lorafuse.library import ExpertLibrary

    ws = ctx.ws
    name = fit_name or ctx.name
    fit = load_fit(ws, name, ctx.kind, need=("adapter",))
    folder = Path(fit["adapter"])
    if not folder.is_dir():
        raise LorafuseError(f"the merged adapter {folder} is missing; fit {name} again")
    library = ExpertLibrary.load([folder], base_model=ws.base_id)
    info: dict[str, Any] = {"experts": ctx.kind, "rank": fit.get("rank")}
    param = fit.get("param")
    if param is not None:
        info[param] = fit.get(param)
    if fit_name is not None:
        library, energy = truncated(library, _rank(ctx.arg, ctx.name))
        info.update(rank=_rank(ctx.arg, ctx.name), exact_rank=fit.get("rank"), **energy)
    with ExitStack() as stack:  # detached on an error here, else when the Prepared closes
        stack.enter_context(attached(ws.model, library, "factors")).set_expert(0)
        return Prepared(lambda b: ws.logits(b.tensors), stack.pop_all().close, info=info)


def truncated(library, k: int) -> tuple[Any, dict[str, float]]:
    """A one-expert library with each module's s B A truncated by SVD to rank `k`, and the
    spectral energy kept: {"energy_min", "energy_mean"} over modules (1.0: nothing lost)."""
    modules, energy = {}, []
    for name, mod in library.modules.items():
        A, B = mod.fold(torch.ones(1), "factors")  # (R, D), (O, R): s B, A
        B, A, kept = truncate_product(B, A, k)  # (O, k), (k, D)
        modules[name] = (A, B)
        energy.append(kept)
    first = next(iter(library.modules.values()))
    merged = MergedAdapter(modules, "deltas", first.fan_in_fan_out, library.base_model)
    stats = {"energy_min": min(energy), "energy_mean": sum(energy) / len(energy)}
    return merged.as_library(), stats


def _rank(arg: str | None, name: str) -> int:
    try:
        k = int(arg or "")
    except ValueError:
        k = 0
    if k < 1:
        raise LorafuseError(f"method {name}: the rank after the colon must be a positive "
                            f"integer (e.g. merge-ties-rank:4); got {arg!r}")  # fmt: skip
    return k


FOLDED = Cost(experts=0, folded=True)
ORIGIN = "PEFT / mergekit"


def _row(name, description, chosen: Chosen, options) -> Method:
    return Method(
        name,
        "merging",
        description,
        prepare_delta_merge,
        options=options,
        fit=partial(fit_delta_merge, chosen=chosen),
        cost=FOLDED,
        origin=ORIGIN,
    )


_ON_VAL = "chosen on validation"
METHODS = (
    _row("merge-task-arithmetic",
         f"task arithmetic (PEFT svd, mergekit task_arithmetic): sum of the deltas with "
         f"w_i = lambda / N, lambda {_ON_VAL}", Chosen(_task_arithmetic, "scale"), ScaleOptions),
    _row("merge-ties",
         f"TIES (PEFT ties_svd): deltas trimmed to their top density, sign elected, disjoint "
         f"mean (w_i = 1), density {_ON_VAL}", Chosen(_ties, "density"), DensityOptions),
    _row("merge-dare-linear",
         f"DARE (PEFT dare_linear_svd): entries dropped at a rate, rescaled, summed with "
         f"w_i = 1/N, drop rate {_ON_VAL}", Chosen(_dare_linear, "drop"), DropOptions),
    _row("merge-dare-ties",
         f"DARE-TIES (PEFT dare_ties_svd): DARE's drop, then TIES' election and disjoint "
         f"mean (w_i = 1), drop rate {_ON_VAL}", Chosen(_dare_ties, "drop"), DropOptions),
    _row("merge-magnitude-prune",
         f"magnitude pruning (PEFT magnitude_prune_svd): deltas trimmed to their top "
         f"density, summed with w_i = 1/N, density {_ON_VAL}",
         Chosen(_magnitude_prune, "density"), DensityOptions),
    _row("merge-breadcrumbs",
         f"Model Breadcrumbs (mergekit): the largest gamma and the smallest magnitudes "
         f"dropped, summed with w_i = 1/N, density {_ON_VAL}",
         Chosen(_breadcrumbs, "density"), BreadcrumbsOptions),
    Method(
        "merge-ties-rank",
        "merging",
        "merge-ties' fit exported by SVD at rank K per module (merge-ties-rank:K), with the "
        "spectral energy kept",
        partial(prepare_delta_merge, fit_name="merge-ties"),
        options=DensityOptions,  # passed on to the fit of merge-ties when it is not listed
        fitted_by="merge-ties",
        needs_arg=True,
        cost=FOLDED,
        origin=ORIGIN,
    ),
)  # fmt: skip
