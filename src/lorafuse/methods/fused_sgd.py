"""SGD through the fused model: the common part of learned merging and routing fits.

The experts are attached once; for each learning rate of the grid fresh mixers are set
and the shared loop (`fit.sgd.train`) minimises the target NLL over training data of all
tasks (no task ids), averaged as the option `objective` says (`fit.data.Objective`:
task-balanced or token-level), only the mixers' parameters requiring grad. Validation is
the evaluation's own metric (mean over tasks of the per-example mean NLL) on a capped
validation subset, whatever the objective; the rate with the lowest validation loss wins.
Checkpoints live under `<fits>/.ckpt/` (named by the settings, so a changed setting
never resumes a stale run) and are removed once the whole fit has finished.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from lorafuse.evaluate import batch_nll, summarize, target_nll
from lorafuse.fit.data import TrainingSet
from lorafuse.fit.options import GridOptions
from lorafuse.fit.sgd import SGDResult, SGDSettings, search_lr, train
from lorafuse.methods.method import Context
from lorafuse.model import Fusion, attached
from lorafuse.parallel import once

VALIDATION_PER_TASK = 32  # default cap of validation examples per task
# make_mixers(library, device) -> (mixers, params): one shared mixer or module -> mixer
MakeMixers = Callable[[Any, torch.device], tuple[Any, dict[str, nn.Parameter]]]


class FusedOptions(GridOptions):
    """Options of a fit through the fused model (merging and routing weights)."""

    validation: bool = Field(True, description="validate (false: none, last weights kept)")
    validation_max_per_task: int | None = Field(
        VALIDATION_PER_TASK, ge=1, description="validation examples per task (null: all)"
    )
    checkpoint_dir: str | None = Field(
        None, description="folder of the resumable checkpoints (default <fits>/.ckpt)"
    )


@dataclass
class FusedFit:
    """The winning run: its mixers (best weights loaded), learning rate and every run.

    A context manager: `with fit_fused(...) as fit:` detaches `fusion` on every exit path.
    """

    fusion: Fusion
    mixers: Any
    lr: float
    result: SGDResult
    initial_validation: float | None
    runs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    close: Callable[[], None] | None = None  # detaches the fusion (default: fusion.detach)

    def summary(self) -> dict[str, Any]:
        """What every fused fit records: lr, the winning run's ending (steps, best and
        final validation loss, stop, converged) and every run."""
        return {"lr": self.lr, **self.result.summary(), "runs": self.runs}

    def detail(self) -> dict[str, Any]:
        """What every fused fit saves besides: the initial validation loss, seconds."""
        return {"initial_validation_loss": self.initial_validation, "seconds": self.seconds}

    def __enter__(self) -> FusedFit:
        return self

    def __exit__(self, *exc) -> None:
        (self.close or self.fusion.detach)()


def fused_loss(ws, data: TrainingSet) -> Callable:
    """loss_fn(indices) -> the training objective (`data.objective`: task-balanced or
    token-level mean) of those examples' target NLL via ws.model."""

    def loss_fn(idx):
        t = data.batch(idx)
        s, c = target_nll(ws.logits(t), t["labels"])  # (B,), (B,)
        return data.objective(idx, s, c)

    return loss_fn


def validation_loss(
    ws, max_per_task: int | None, logits: Callable | None = None
) -> Callable[[], float]:
    """validate() -> mean over tasks of the validation loss of the model as it is now.

    `logits(tensors) -> (B, T, V)` is the model to score (default: the workspace's, with
    whatever is attached to it).
    """
    batches = ws.batches("validation", max_per_task)
    tasks = [t for b in batches for t in b.tasks]
    forward = logits or ws.logits

    def validate() -> float:
        sums, counts = batch_nll(lambda b: forward(b.tensors), batches)
        return summarize(sums, counts, tasks, "fit", "validation").mean

    return validate


def fit_fused(ctx: Context, make_mixers: MakeMixers, space: str = "factors") -> FusedFit:
    """Learn mixers by SGD through the model with the context's experts attached.

    `make_mixers(library, device)` returns fresh (mixers, params); they are set on the
    fusion for each rate of `ctx.options.grid()` (FusedOptions). The winning rate is the
    one with the lowest validation loss; its run's convergence is the fit's. The fusion
    stays attached with the winning mixers: use the result as a context manager (`with
    fit_fused(...) as fit:`), which detaches it.
    """
    ws, options = ctx.ws, ctx.options
    start = time.perf_counter()
    data = TrainingSet(ws, "train", options.max_examples_per_task, options.objective)
    validate = validation_loss(ws, options.validation_max_per_task) if options.validation else None
    ckpt_dir = Path(options.checkpoint_dir or Path(ws.fits_dir) / ".ckpt")
    ckpts, initial, winner = [], [], {}
    with ExitStack() as stack:  # detached here on an error, else by the caller's `with`
        fusion = stack.enter_context(attached(ws.model, ctx.library, space))

        def run(lr: float) -> SGDResult:
            mixers, params = make_mixers(ctx.library, ws.device)  # the same start every rate
            fusion.set_mixers(_as_mixers(fusion, mixers))
            if not initial:
                initial.append(validate() if validate is not None else None)
            settings = options.settings(lr)
            digest = _digest(ctx.name, ctx.kind, space, settings, options)
            ckpt = ckpt_dir / f"{ctx.name}__{ctx.kind}__{digest}.pt"
            ckpts.append(ckpt)
            res = train(
                params, fused_loss(ws, data), len(data), settings, validate, ckpt, ctx.progress
            )
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(res.state[n])
            winner[lr] = mixers
            return res

        lr, res, runs = search_lr(options.grid(), run)
        close = stack.pop_all().close  # kept: dropping it would detach the fusion
    # The main process alone wrote the checkpoints and removes them (another process
    # removing the folder while it writes would fail it), the others waiting until done.
    once(lambda: _remove_checkpoints(ckpts, ckpt_dir))
    fit = FusedFit(fusion, winner[lr], lr, res, initial[0], runs, close=close)
    fusion.set_mixers(_as_mixers(fusion, fit.mixers))
    fit.seconds = round(time.perf_counter() - start, 3)
    return fit


def _remove_checkpoints(ckpts: list[Path], folder: Path) -> None:
    for ckpt in ckpts:
        ckpt.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def _as_mixers(fusion: Fusion, mixers) -> dict[str, Any]:
    # One shared mixer (global weights) or a dict module path -> mixer.
    return mixers if isinstance(mixers, dict) else dict.fromkeys(fusion.layers, mixers)


def _digest(name, kind, space, settings: SGDSettings, options) -> str:
    shown = options.model_dump(mode="json")
    blob = json.dumps([name, kind, space, vars(settings), shown], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]
