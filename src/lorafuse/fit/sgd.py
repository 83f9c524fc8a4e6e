"""The one training loop: coefficient fits, the benchmark's base model and its experts.

Only the given parameters are trained, by AdamW over the schedule of `fit.schedule`
(linear warm-up, then a cosine or a constant rate, `SGDSettings`), with gradient
accumulation and optional clipping of the gradient's norm. What differs between the
trainers is given as hooks:
- `loss_fn(items)`: the mean loss over the items of a micro-batch (a fit's objective, the
  base model's token loss, the sum of K experts' own losses);
- `batches(step)`: the items of a step's global batch; by default example indices, each
  epoch in an order that is a pure function of (seed, epoch) (`epoch_order`). The base
  model reads its pretraining stream in order, the experts draw their rows from their
  own samplers;
- `validate()` (early stopping, the best parameters kept), `progress(step, loss)` after
  each step, and a `checkpoint` file to resume from.
With a `batches` that is a pure function of the step, a run resumed from a checkpoint
takes exactly the steps an uninterrupted run takes. Under `accelerate launch` each
process computes the loss on its share of every global batch and gradients are averaged
across processes, so N processes give the weights of one.

When a run stops (`SGDResult.stop`):
- "plateau": `patience` validations in a row did not improve on the reference loss (the
  last loss that was an improvement) by more than `min_delta` of it (relative: `val`
  improves when val < ref - min_delta * |ref|). The only stop that counts as converged.
- "step cap": `max_steps` optimizer steps were taken first.
- "epochs": the `epochs` passes over the data were taken first.
- "no validation": no `validate` was given, so the whole budget ran and nothing tells
  whether the loss had flattened.
The best parameters (lowest validation loss, however small the improvement) are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorafuse.errors import LorafuseError
from lorafuse.fit.schedule import lr_factor, warmup_steps
from lorafuse.fit.settings import EPOCHS, SGDSettings, budget  # SGDSettings, budget: re-exported
from lorafuse.io import atomic_file
from lorafuse.parallel import is_main_process, once, rank, world_size

LossFn = Callable[[Sequence[Any]], Tensor]  # a micro-batch's items -> mean loss over them
Batches = Callable[[int], Sequence[Any]]  # step (0-based) -> the items of its global batch
PLATEAU, NO_VALIDATION = "plateau", "no validation"
LR_GRID = (1e-3, 1e-4, 1e-5)  # the paper's learning rates


@dataclass
class SGDResult:
    """What a run learned: the best parameters (by validation loss) and how it ended.

    `converged` is True exactly when the run stopped on a plateau (`stop == "plateau"`);
    a run that reached its step cap or its epochs, or had no validation, is not converged,
    however flat its last losses were.
    """

    state: dict[str, Tensor]
    best_val: float | None
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None  # the step of the best validation loss
    final_val: float | None = None  # the last validation loss
    stop: str = EPOCHS  # plateau | step cap | epochs | no validation

    @property
    def converged(self) -> bool:
        """True exactly when the run stopped because the validation loss plateaued."""
        return self.stop == PLATEAU

    def summary(self) -> dict[str, Any]:
        """The run's ending as plain values: steps, best_step, validation_loss (best),
        final_validation_loss, stop, converged (what a fit's payload records)."""
        return {
            "steps": self.steps,
            "best_step": self.best_step,
            "validation_loss": self.best_val,
            "final_validation_loss": self.final_val,
            "stop": self.stop,
            "converged": self.converged,
        }


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch, a pure function of (n, seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def train(
    params: dict[str, nn.Parameter],
    loss_fn: LossFn,
    n_examples: int,
    settings: SGDSettings,
    validate: Callable[[], float] | None = None,
    checkpoint: str | Path | None = None,
    progress: Callable[[int, float], None] | None = None,
    *,
    batches: Batches | None = None,
) -> SGDResult:
    """Minimise `loss_fn` over the parameters `params` (name -> Parameter).

    `loss_fn(items)` returns the mean loss over those items of a batch: training example
    indices, or whatever `batches(step)` returns for each step (default: `batch_size`
    indices of `n_examples`, shuffled per epoch). The budget counts epochs of
    `n_examples // batch_size` steps. `validate()` returns a validation loss (lower is
    better), every `eval_every` steps and after the last step; the best parameters are
    kept and, with `patience`, training stops on a plateau (module docstring). With
    `checkpoint`, state (the stop included) is saved after every validation and a run
    finds and resumes it. `progress(step, loss)` after each step (`step` steps taken).
    Raises LorafuseError when `params` is empty or the checkpoint is not this run's.
    """
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())
    named = dict(params)
    if not named:
        raise LorafuseError("nothing to train: no parameters were given")
    opt = torch.optim.AdamW(
        named.values(), lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
    )
    steps_per_epoch = max(1, n_examples // settings.batch_size)
    total, at_cap = budget(settings, steps_per_epoch)
    eval_every = settings.eval_every or steps_per_epoch
    draw = batches or _shuffled(n_examples, settings.seed, settings.batch_size, steps_per_epoch)
    state = _fresh_state()
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and once(ckpt.exists):  # the main process's answer, for all
        state = _load(ckpt, named, opt)
    rate = _rate(settings, total)
    _set_lr(opt, rate(state["step"]))
    while state["stop"] is None and state["step"] < total:
        loss = _step(named, loss_fn, list(draw(state["step"])), settings.grad_accum, acc)
        if settings.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(named.values()), settings.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        _set_lr(opt, rate(state["step"]))
        if progress is not None:
            progress(state["step"], loss)
        if validate is not None and (state["step"] % eval_every == 0 or state["step"] == total):
            _record(state, float(validate()), loss, named, settings)
            if ckpt is not None and is_main_process():
                _save(ckpt, named, opt, state)
    stop = state["stop"] or (NO_VALIDATION if validate is None else at_cap)
    best = state["best"] or {n: p.detach().clone() for n, p in named.items()}
    final = state["history"][-1]["validation"] if state["history"] else None
    return SGDResult(
        best, state["best_val"], state["step"], state["history"], state["best_step"], final, stop
    )


def search_lr(
    grid: Sequence[float], run: Callable[[float], SGDResult]
) -> tuple[float, SGDResult, list[dict[str, Any]]]:
    """The one learning-rate search: `run(lr)` for every rate of `grid`, in order.

    Returns (lr, result) of the run with the lowest best validation loss (a run without
    validation counts as +inf, so the first rate wins when none validates) and every
    run's record: {"lr", its `summary()`, "history"}.
    """
    runs, best = [], None
    for lr in grid:
        res = run(lr)
        runs.append({"lr": lr, **res.summary(), "history": res.history})
        score = res.best_val if res.best_val is not None else float("inf")
        if best is None or score < best[0]:
            best = (score, lr, res)
    if best is None:
        raise LorafuseError("the learning-rate grid is empty")
    return best[1], best[2], runs


def _shuffled(n: int, seed: int, batch_size: int, steps_per_epoch: int) -> Batches:
    # The default batches: step -> its slice of its epoch's order.
    def draw(step: int) -> list[int]:
        epoch, k = divmod(step, steps_per_epoch)
        return epoch_order(n, seed, epoch)[k * batch_size : (k + 1) * batch_size]

    return draw


def _rate(settings: SGDSettings, total: int) -> Callable[[int], float]:
    # step (steps taken) -> the learning rate of the next step.
    warm = settings.warmup_steps
    warm = warmup_steps(settings.warmup, total) if warm is None else warm
    decay = settings.decays()
    return lambda step: settings.lr * lr_factor(step, total, warm, settings.floor, decay)


def _set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def _fresh_state() -> dict[str, Any]:
    # ref_val: the last validation loss that improved by more than min_delta (patience's
    # reference); best_val: the lowest loss seen (whose parameters are kept).
    return {"step": 0, "best_val": None, "best_step": None, "best": None, "ref_val": None,
            "bad_evals": 0, "stop": None, "history": []}  # fmt: skip


def _record(state: dict[str, Any], val: float, loss: float, named, settings: SGDSettings) -> None:
    # One validation: keep the best parameters, count validations without a real
    # improvement, and decide whether the loss has plateaued.
    state["history"].append({"step": state["step"], "train": loss, "validation": val})
    if state["best_val"] is None or val < state["best_val"]:
        state["best_val"], state["best_step"] = val, state["step"]
        state["best"] = {n: p.detach().clone() for n, p in named.items()}
    ref = state["ref_val"]
    if ref is None or val < ref - settings.min_delta * abs(ref):
        state["ref_val"], state["bad_evals"] = val, 0
    else:
        state["bad_evals"] += 1
    if settings.patience is not None and state["bad_evals"] >= settings.patience:
        state["stop"] = PLATEAU


def _step(named, loss_fn: LossFn, batch: list[int], accum: int, acc) -> float:
    # This process's share of the global batch, in `accum` micro-batches; the gradient
    # is that of the mean loss over the whole global batch.
    world, me = world_size(), rank()  # one inside `parallel.once`: no reduce then
    share = len(batch) // world
    mine = batch[me * share : (me + 1) * share] if world > 1 else batch
    micro = max(1, len(mine) // accum)
    total = 0.0
    for start in range(0, len(mine), micro):
        part = mine[start : start + micro]
        loss = loss_fn(part) * (len(part) / len(mine))
        loss.backward()
        total += float(loss.detach())
    if world > 1:
        for p in named.values():
            if p.grad is not None:
                p.grad = acc.reduce(p.grad, reduction="mean")
        total = float(acc.reduce(torch.tensor(total), reduction="mean"))
    return total


def _save(path: Path, named, opt, state) -> None:
    payload = {
        "params": {n: p.detach().clone() for n, p in named.items()},
        "optimizer": opt.state_dict(),
        "state": {k: v for k, v in state.items() if k != "best"},
        "best": state["best"],
    }
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def _load(path: Path, named, opt) -> dict[str, Any]:
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as e:
        raise LorafuseError(f"cannot resume from {path} ({e}); delete it to start over") from None
    keys = ("params", "optimizer", "state", "best")
    if not isinstance(payload, dict) or not all(k in payload for k in keys):
        got = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise LorafuseError(
            f"checkpoint {path} is not a lorafuse fit checkpoint (needs {list(keys)}, got "
            f"{got}); delete it to start over"
        )
    if not isinstance(payload["params"], dict) or set(payload["params"]) != set(named):
        raise LorafuseError(f"checkpoint {path} is for other parameters; delete it to start over")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(payload["params"][n])
    opt.load_state_dict(payload["optimizer"])
    state = {**_fresh_state(), **payload["state"]}  # a checkpoint older than a key: default
    state["best"] = payload["best"]
    return state
