"""The one training loop for every learned set of coefficients.

Only the given parameters are trained (AdamW, linear warm-up then cosine decay, gradient
accumulation). The data order of each epoch is a pure function of (seed, epoch), so a run
resumed from a checkpoint takes exactly the steps an uninterrupted run takes. Under
`accelerate launch` each process computes the loss on its share of every global batch and
gradients are averaged across processes, so N processes give the weights of one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorafuse.errors import LorafuseError

LossFn = Callable[[Sequence[int]], Tensor]  # example indices -> mean loss over them


@dataclass
class SGDSettings:
    """Settings of one training run (saved with its results)."""

    lr: float = 1e-3
    epochs: int = 5
    batch_size: int = 16  # examples per optimizer step (global, all processes together)
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup: float = 0.06  # fraction of the steps spent warming up
    weight_decay: float = 0.0
    eval_every: int | None = None  # steps between validations (default: once per epoch)
    patience: int | None = None  # stop after this many validations without improvement
    max_steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise LorafuseError(f"invalid training settings: {asdict(self)}")
        if self.batch_size % self.grad_accum:
            raise LorafuseError(
                f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}"
            )


@dataclass
class SGDResult:
    """What a run learned: the best parameters (by validation loss) and its history."""

    state: dict[str, Tensor]
    best_val: float | None
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)


def schedule(step: int, total: int, warmup: float) -> float:
    """Learning-rate factor at `step`: linear warm-up over warmup*total, then cosine to 0."""
    w = max(1, int(round(warmup * total)))
    if step < w:
        return (step + 1) / w
    progress = (step - w) / max(1, total - w)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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
) -> SGDResult:
    """Minimise `loss_fn` over the parameters `params` (name -> Parameter).

    `loss_fn(indices)` returns the mean loss over those training examples. `validate()`
    returns a validation loss (lower is better); the best parameters are kept and, with
    `patience`, training stops early. With `checkpoint`, state is saved after every
    validation and a run finds and resumes it. `progress(step, loss)` after each step.
    """
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())
    named = dict(params)
    if not named:
        raise LorafuseError("nothing to train: no coefficient parameters were given")
    opt = torch.optim.AdamW(named.values(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, n_examples // settings.batch_size)
    total = steps_per_epoch * settings.epochs
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)
    eval_every = settings.eval_every or steps_per_epoch
    state = {"step": 0, "best_val": None, "best": None, "bad_evals": 0, "history": []}
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        state = _load(ckpt, named, opt)
    for g in opt.param_groups:
        g["lr"] = settings.lr * schedule(state["step"], total, settings.warmup)
    while state["step"] < total:
        step = state["step"]
        epoch, k = divmod(step, steps_per_epoch)
        order = epoch_order(n_examples, settings.seed, epoch)
        batch = order[k * settings.batch_size : (k + 1) * settings.batch_size]
        loss = _step(named, loss_fn, batch, settings.grad_accum, acc)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] = step + 1
        for g in opt.param_groups:
            g["lr"] = settings.lr * schedule(state["step"], total, settings.warmup)
        if progress is not None:
            progress(state["step"], loss)
        if validate is not None and (state["step"] % eval_every == 0 or state["step"] == total):
            val = float(validate())
            state["history"].append({"step": state["step"], "train": loss, "validation": val})
            if state["best_val"] is None or val < state["best_val"]:
                state["best_val"], state["bad_evals"] = val, 0
                state["best"] = {n: p.detach().clone() for n, p in named.items()}
            else:
                state["bad_evals"] += 1
            if ckpt is not None and acc.is_main_process:
                _save(ckpt, named, opt, state)
            if settings.patience is not None and state["bad_evals"] >= settings.patience:
                break
    best = state["best"] or {n: p.detach().clone() for n, p in named.items()}
    return SGDResult(best, state["best_val"], state["step"], state["history"])


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
    tmp = path.with_suffix(".tmp")
    payload = {
        "params": {n: p.detach().clone() for n, p in named.items()},
        "optimizer": opt.state_dict(),
        "state": {k: v for k, v in state.items() if k != "best"},
        "best": state["best"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, tmp)
    tmp.replace(path)


def _load(path: Path, named, opt) -> dict[str, Any]:
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as e:
        raise LorafuseError(f"cannot resume from {path} ({e}); delete it to start over") from None
    if set(payload["params"]) != set(named):
        raise LorafuseError(f"checkpoint {path} is for other parameters; delete it to start over")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(payload["params"][n])
    opt.load_state_dict(payload["optimizer"])
    state = dict(payload["state"])
    state["best"] = payload["best"]
    return state
