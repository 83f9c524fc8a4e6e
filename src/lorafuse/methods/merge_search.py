"""merge-search: merge weights found without gradients (LoraHub's setting, beyond the paper).

One weight per expert (or per expert and fused layer, `layerwise`), searched by CMA-ES
(lorafuse.fit.search) in [-bound, bound] from uniform 1/N, minimising

    objective(w) + l1 * mean_i |w_i|

where objective(w) is merge-sgd-global's training objective (fit.data.Objective: task-
balanced or token-level mean NLL) on the same training examples, with w the factors-space
coefficients (the paper's space, LoraHub's: A* = sum w_i A_i, B* = sum w_i s_i B_i; they
need not sum to 1). Each evaluation is one forward pass over those examples (no
backward), and the budget `max_passes` counts them. The best weights are saved as
merge-sgd-global saves its own (fit file `weights` per module, and the merged adapter) and
evaluated the same way: fixed coefficients in the fused layer, folded at no cost.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator

from lorafuse.errors import LorafuseWarning
from lorafuse.evaluate import batch_nll
from lorafuse.fit.data import Objective, ObjectiveName
from lorafuse.fit.options import Options
from lorafuse.fit.search import SearchSettings, cma_search, require_cma
from lorafuse.merge import merge, save_adapter
from lorafuse.methods.fused_sgd import VALIDATION_PER_TASK, validation_loss
from lorafuse.methods.merging import SPACE, adapter_dir, prepare_merge_sgd
from lorafuse.methods.method import Context, Cost, Fitted, Method
from lorafuse.model import attached
from lorafuse.parallel import once


class SearchOptions(Options):
    """Options of merge-search (LoraHub's defaults for the bound and the L1 weight)."""

    max_passes: int = Field(
        200, ge=2, description="budget: objective evaluations (forward passes over the fit data)"
    )
    popsize: int | None = Field(
        None, ge=2, description="candidates per CMA-ES generation (null: 4 + 3 ln n)"
    )
    sigma: float = Field(0.1, gt=0, allow_inf_nan=False, description="CMA-ES initial step")
    bound: float = Field(1.5, gt=0, allow_inf_nan=False, description="weights in [-bound, bound]")
    l1: float = Field(
        0.05, ge=0, allow_inf_nan=False, description="L1 penalty: objective + l1 * mean |w|"
    )
    layerwise: bool = Field(False, description="one weight vector per fused layer")
    patience: int | None = Field(
        3, ge=1, description="stop after this many generations without improvement"
    )
    min_delta: float = Field(
        1e-3, ge=0, lt=1, description="relative improvement a generation must make to count"
    )
    seed: int = Field(0, ge=0, description="seed of the search")
    max_examples_per_task: int | None = Field(
        None, ge=1, description="training examples per task (null: all)"
    )
    objective: ObjectiveName = Field(
        "task", description="training loss: task (task-balanced) or token (the paper's)"
    )
    validation_max_per_task: int | None = Field(
        VALIDATION_PER_TASK, ge=1, description="validation examples per task (null: all)"
    )

    @model_validator(mode="after")
    def _budget(self) -> SearchOptions:
        if self.popsize is not None and self.max_passes < 1 + self.popsize:
            raise ValueError(
                f"max_passes {self.max_passes} cannot hold the start and one generation of "
                f"popsize {self.popsize}; give at least {1 + self.popsize}"
            )
        return self

    def settings(self) -> SearchSettings:
        """The search's settings."""
        keys = ("max_passes", "popsize", "sigma", "bound", "seed", "patience", "min_delta")
        return SearchSettings(**{k: getattr(self, k) for k in keys})


def fit_merge_search(ctx: Context) -> Fitted:
    """Search the merge weights; save them (fit file and merged adapter); return the fit.

    Raises LorafuseError when cma is not installed (saying how to install it), when the
    start 1/N lies outside the bounds or the budget cannot hold one generation.
    """
    require_cma()
    ws, lib, o = ctx.ws, ctx.library, ctx.options
    start = time.perf_counter()
    N, modules = len(lib), list(lib.modules)
    batches = ws.batches("train", o.max_examples_per_task)
    objective = Objective([t for b in batches for t in b.tasks], o.objective)
    every = list(range(len(objective.weights)))

    def coefficients(x: np.ndarray) -> dict[str, torch.Tensor]:
        w = torch.as_tensor(x, dtype=torch.float32)  # (N,) or (M * N,)
        if not o.layerwise:
            return dict.fromkeys(modules, w)
        return {m: w[i * N : (i + 1) * N] for i, m in enumerate(modules)}

    with attached(ws.model, lib, SPACE) as fusion, torch.no_grad():

        def loss(x: np.ndarray) -> float:
            fusion.set_coefficients(coefficients(x))
            sums, counts = batch_nll(lambda b: ws.logits(b.tensors), batches)  # (M,), (M,)
            return float(objective(every, sums, counts))

        def penalised(x: np.ndarray) -> float:
            return loss(x) + o.l1 * float(np.abs(x).mean())

        dim = N * (len(modules) if o.layerwise else 1)
        result = cma_search(penalised, np.full(dim, 1.0 / N), o.settings())
        best = np.asarray(result.x)
        train_loss = loss(best)
        fusion.set_coefficients(coefficients(best))
        val = validation_loss(ws, o.validation_max_per_task)()
    weights = coefficients(best)
    with warnings.catch_warnings():  # weights off the simplex are the point: no warning
        warnings.simplefilter("ignore", LorafuseWarning)
        merged = merge(lib, weights, SPACE)
    merged.meta["method"] = ctx.name
    out = adapter_dir(ws, ctx.name, ctx.kind)
    once(lambda: save_adapter(merged, out, force=True))  # the main process writes
    summary: dict[str, Any] = {
        "weights": {m: w.tolist() for m, w in weights.items()},
        "experts_order": lib.names,
        "adapter": str(out),
        "loss": train_loss,
        "validation_loss": val,
        "l1": o.l1,
        **result.summary(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    detail = {
        "space": SPACE,
        "history": result.history,
        "search": result.settings,
        "examples_per_pass": len(every),
    }
    if not o.layerwise:
        detail["global_weights"] = next(iter(weights.values())).tolist()
    return Fitted(summary, detail)


METHODS = (
    Method(
        "merge-search",
        "merging",
        "LoraHub: one weight per expert (or per layer) in [-1.5, 1.5], found by CMA-ES on "
        "merge-sgd-global's training objective plus an L1 penalty, within a budget of "
        "forward passes (factors merged)",
        prepare_merge_sgd,
        options=SearchOptions,
        fit=fit_merge_search,
        cost=Cost(experts=0, folded=True),
        origin="LoraHub",
    ),
)
