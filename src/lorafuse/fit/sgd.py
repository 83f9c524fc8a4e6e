"""The one training loop for every learned set of coefficients.

Only the given parameters are trained (AdamW, linear warm-up then cosine decay over the
budget, gradient accumulation). A run that trains until a plateau (`epochs` None, at most
`max_steps`) keeps its learning rate constant after the warm-up instead: a cosine over the
cap would flatten the loss by annealing the rate to zero, and that flat end would pass
for a plateau. The data order of each epoch is a pure function of (seed, epoch), so a run
resumed from a checkpoint takes exactly the steps an uninterrupted run takes. Under
`accelerate launch` each process computes the loss on its share of every global batch and
gradients are averaged across processes, so N processes give the weights of one.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorafuse.errors import LorafuseError
from lorafuse.fit.schedule import lr_factor, warmup_steps
from lorafuse.io import atomic_file

LossFn = Callable[[Sequence[int]], Tensor]  # example indices -> mean loss over them
PLATEAU, STEP_CAP, EPOCHS, NO_VALIDATION = "plateau", "step cap", "epochs", "no validation"
LR_GRID = (1e-3, 1e-4, 1e-5)  # the paper's learning rates


@dataclass
class SGDSettings:
    """Settings of one training run (saved with its results).

    The budget is `epochs` passes over the data, capped at `max_steps`; `epochs=None`
    drops the epoch budget ("train until the validation loss plateaus, at most
    `max_steps` steps") and then needs `max_steps`. `patience` (validations without an
    improvement of more than `min_delta`, relative) stops early; `eval_every` steps
    between validations (default once per epoch). Raises LorafuseError naming a bad value.
    """

    lr: float = 1e-3
    epochs: int | None = 5
    batch_size: int = 16  # examples per optimizer step (global, all processes together)
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup: float = 0.06  # fraction of the steps (of the budget) spent warming up
    weight_decay: float = 0.0
    eval_every: int | None = None  # steps between validations (default: once per epoch)
    patience: int | None = None  # stop after this many validations without improvement
    min_delta: float = 1e-3  # relative improvement a validation must make to count
    max_steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        problems = "; ".join(p for p in _problems(self) if p)
        if problems:
            raise LorafuseError(f"invalid training settings ({problems}): {asdict(self)}")
        if self.batch_size % self.grad_accum:
            raise LorafuseError(
                f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}"
            )


def _problems(s: SGDSettings) -> list[str]:
    def whole(name: str, low: int, optional: bool = False) -> str:
        v = getattr(s, name)
        if v is None and optional:
            return ""
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            return f"{name} must be an integer >= {low}" + (" or null" if optional else "")
        return ""

    def real(name: str, ok: Callable[[float], bool], what: str) -> str:
        v = getattr(s, name)
        good = isinstance(v, (int, float)) and not isinstance(v, bool) and ok(v)
        return "" if good else f"{name} must be a number {what}"

    out = [whole("batch_size", 1), whole("grad_accum", 1), whole("seed", 0)]
    out += [whole("epochs", 1, True), whole("max_steps", 1, True)]
    out += [whole("eval_every", 1, True), whole("patience", 1, True)]
    out += [real("lr", lambda v: v > 0, "> 0"), real("warmup", lambda v: 0 <= v <= 1, "in [0, 1]")]
    out += [real("weight_decay", lambda v: v >= 0, ">= 0")]
    out += [real("min_delta", lambda v: 0 <= v < 1, "in [0, 1) (relative)")]
    if s.epochs is None and s.max_steps is None:
        out.append("epochs null (train until a plateau) needs max_steps, the step cap")
    return out


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


def budget(settings: SGDSettings, steps_per_epoch: int) -> tuple[int, str]:
    """(total steps, the stop reason when they are all taken): the smaller of the epoch
    budget and `max_steps` ("step cap" on a tie)."""
    if settings.epochs is None:
        return settings.max_steps, STEP_CAP
    by_epochs = steps_per_epoch * settings.epochs
    if settings.max_steps is not None and settings.max_steps <= by_epochs:
        return settings.max_steps, STEP_CAP
    return by_epochs, EPOCHS


def train(
    params: dict[str, nn.Parameter],
    loss_fn: LossFn,
    n_examples: int,
    settings: SGDSettings,
    validate: Callable[[], float] | None = None,
    checkpoint: str | Path | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> SGDResult:
    """Minimise `loss_fn` over the parameters `params` (name -> Parameter).

    `loss_fn(indices)` returns the mean loss over those training examples. `validate()`
    returns a validation loss (lower is better), every `eval_every` steps and after the
    last step; the best parameters are kept and, with `patience`, training stops on a
    plateau (module docstring). With `checkpoint`, state (the stop included) is saved
    after every validation and a run finds and resumes it. `progress(step, loss)` after
    each step. Raises LorafuseError when `params` is empty or the checkpoint is not this
    run's.
    """
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())
    named = dict(params)
    if not named:
        raise LorafuseError("nothing to train: no coefficient parameters were given")
    opt = torch.optim.AdamW(named.values(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, n_examples // settings.batch_size)
    total, at_cap = budget(settings, steps_per_epoch)
    eval_every = settings.eval_every or steps_per_epoch
    state = _fresh_state()
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        state = _load(ckpt, named, opt)
    decay = settings.epochs is not None  # until a plateau: constant after the warm-up
    warm = warmup_steps(settings.warmup, total)
    for g in opt.param_groups:
        g["lr"] = settings.lr * lr_factor(state["step"], total, warm, decay=decay)
    while state["stop"] is None and state["step"] < total:
        step = state["step"]
        epoch, k = divmod(step, steps_per_epoch)
        order = epoch_order(n_examples, settings.seed, epoch)
        batch = order[k * settings.batch_size : (k + 1) * settings.batch_size]
        loss = _step(named, loss_fn, batch, settings.grad_accum, acc)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] = step + 1
        for g in opt.param_groups:
            g["lr"] = settings.lr * lr_factor(state["step"], total, warm, decay=decay)
        if progress is not None:
            progress(state["step"], loss)
        if validate is not None and (state["step"] % eval_every == 0 or state["step"] == total):
            _record(state, float(validate()), loss, named, settings)
            if ckpt is not None and acc.is_main_process:
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


def is_main_process() -> bool:
    """True in the process that writes outputs (always, outside `accelerate launch`)."""
    from accelerate import PartialState

    return PartialState().is_main_process


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
    world, rank = acc.num_processes, acc.process_index
    share = len(batch) // world
    mine = batch[rank * share : (rank + 1) * share] if world > 1 else batch
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
