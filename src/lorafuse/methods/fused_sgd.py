"""SGD through the fused model: the common part of learned merging and routing fits.

The experts are attached once; for each learning rate of the grid fresh mixers are set
and the shared loop (`fit.sgd.train`) minimises the task-balanced mean target NLL over
training data of all tasks (no task ids), only the mixers' parameters requiring grad.
Validation is the evaluation's own metric (mean over tasks of the per-example mean NLL)
on a capped validation subset; the rate with the lowest validation loss wins.
Checkpoints live under `<fits>/.ckpt/` (named by the settings, so a changed setting
never resumes a stale run) and are removed once the whole fit has finished.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafuse.evaluate import batch_nll, summarize, target_nll
from lorafuse.fit.sgd import SGDResult, SGDSettings, lr_grid, settings_from, train
from lorafuse.methods.ensemble_sgd import TrainingSet
from lorafuse.model import Fusion, attach

VALIDATION_PER_TASK = 32  # default cap of validation examples per task


@dataclass
class FusedFit:
    """The winning run: its mixers (best weights loaded), learning rate and every run."""

    fusion: Fusion
    mixers: Any
    lr: float
    result: SGDResult
    initial_validation: float | None
    runs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def payload(self) -> dict[str, Any]:
        """The fit's record shared by every fused method: lr, the winning run's ending
        (steps, best and final validation loss, stop, converged), every run, seconds."""
        return {
            "lr": self.lr,
            **self.result.summary(),
            "initial_validation_loss": self.initial_validation,
            "runs": self.runs,
            "seconds": self.seconds,
        }


def fused_loss(ws, data: TrainingSet) -> Callable:
    """loss_fn(indices) -> task-balanced mean target NLL of those examples via ws.model."""

    def loss_fn(idx):
        t = data.batch(idx)
        s, c = target_nll(ws.logits(t), t["labels"])  # (B,), (B,)
        return (data.weights[list(idx)].to(s.device) * s / c).mean()

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


def fit_fused(
    ws,
    kind: str,
    name: str,
    make_mixers: Callable[[Fusion], tuple[Any, dict[str, nn.Parameter]]],
    options: dict[str, Any],
    space: str = "factors",
) -> FusedFit:
    """Learn mixers by SGD through the model with the `kind` experts attached.

    `make_mixers(fusion)` sets fresh mixers on the fusion and returns (mixers, params).
    Options: lr / lr_grid, epochs (null: until a plateau), batch_size, seed, max_steps,
    grad_accum, warmup, patience, min_delta, eval_every (`fit.sgd.settings_from`),
    max_examples_per_task, validation (False: no validation, last weights kept),
    validation_max_per_task, progress(step, loss), checkpoint_dir. The winning rate is
    the one with the lowest validation loss; its run's convergence is the fit's. The
    fusion stays attached with the winning mixers; the caller detaches it.
    """
    start = time.perf_counter()
    data = TrainingSet(ws, "train", options.get("max_examples_per_task"))
    validate = None
    if options.get("validation", True):
        cap = options.get("validation_max_per_task", VALIDATION_PER_TASK)
        validate = validation_loss(ws, cap)
    ckpt_dir = Path(options.get("checkpoint_dir") or Path(ws.fits_dir) / ".ckpt")
    fusion = attach(ws.model, ws.library(kind), space)
    runs, best, ckpts, initial = [], None, [], None
    try:
        for i, lr in enumerate(lr_grid(options)):
            mixers, params = make_mixers(fusion)  # the same start for every rate
            if i == 0 and validate is not None:
                initial = validate()
            settings = settings_from(options, lr)
            ckpt = ckpt_dir / f"{name}__{kind}__{_digest(name, kind, space, settings, options)}.pt"
            ckpts.append(ckpt)
            res = train(
                params, fused_loss(ws, data), len(data), settings, validate, ckpt,
                options.get("progress"),
            )  # fmt: skip
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(res.state[n])
            runs.append({"lr": lr, **res.summary(), "history": res.history})
            score = res.best_val if res.best_val is not None else float("inf")
            if best is None or score < best[0]:
                best = (score, FusedFit(fusion, mixers, lr, res, initial))
    except BaseException:
        fusion.detach()
        raise
    for ckpt in ckpts:
        ckpt.unlink(missing_ok=True)
    if ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    fit = best[1]
    fusion.set_mixers(_as_mixers(fusion, fit.mixers))
    fit.runs, fit.seconds = runs, round(time.perf_counter() - start, 3)
    return fit


def is_main_process() -> bool:
    """True in the process that writes outputs (always, outside `accelerate launch`)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def _as_mixers(fusion: Fusion, mixers) -> dict[str, Any]:
    # One shared mixer (global weights) or a dict module path -> mixer.
    return mixers if isinstance(mixers, dict) else dict.fromkeys(fusion.layers, mixers)


def _digest(name, kind, space, settings: SGDSettings, options: dict[str, Any]) -> str:
    shown = {k: v for k, v in options.items() if isinstance(v, (int, float, str, bool, list))}
    blob = json.dumps([name, kind, space, vars(settings), shown], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]
