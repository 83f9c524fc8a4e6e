"""The one settings class of the training loop (`fit.sgd.train`) and its step budget.

Every trainer fills it: the coefficient fits (through `fit.options.LoopOptions`), the
benchmark's base model (`benchmark.pretrain.BaseSettings.loop`) and its experts
(`benchmark.train.ExpertSettings.loop`). The defaults are the fits'; the benchmark's
differences are values of the same fields (a warm-up in steps, a cosine down to a floor,
AdamW's betas, gradient clipping), not a second loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from lorafuse.errors import LorafuseError

STEP_CAP, EPOCHS = "step cap", "epochs"


@dataclass
class SGDSettings:
    """Settings of one training run (saved with its results).

    The budget is `epochs` passes over the data, capped at `max_steps`; `epochs=None`
    drops the epoch budget ("train until the validation loss plateaus, at most
    `max_steps` steps") and then needs `max_steps`. `patience` (validations without an
    improvement of more than `min_delta`, relative) stops early; `eval_every` steps
    between validations (default once per epoch). The learning rate warms up linearly
    over `warmup_steps` steps (default: the fraction `warmup` of the budget), then follows
    a cosine from `lr` down to `floor * lr` at the last step when `decay` (default: only
    with an epoch budget; until a plateau it stays constant). `max_grad_norm` clips the
    gradient's global norm before each step. Raises LorafuseError naming a bad value.
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
    warmup_steps: int | None = None  # warm-up in steps (None: the fraction `warmup`)
    floor: float = 0.0  # the cosine's end, a fraction of `lr`
    decay: bool | None = None  # cosine after the warm-up (None: unless epochs is None)
    max_grad_norm: float | None = None  # clip the gradient's global norm (None: never)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's moment decays

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):  # as read back from JSON
            self.betas = tuple(self.betas)
        problems = "; ".join(p for p in _problems(self) if p)
        if problems:
            raise LorafuseError(f"invalid training settings ({problems}): {asdict(self)}")
        if self.batch_size % self.grad_accum:
            raise LorafuseError(
                f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}"
            )

    def decays(self) -> bool:
        """Whether the rate follows the cosine after the warm-up (`decay`, by default
        only with an epoch budget: a cosine over a plateau's cap would anneal the rate to
        zero and pass the flat end for a plateau)."""
        return self.epochs is not None if self.decay is None else self.decay


def _problems(s: SGDSettings) -> list[str]:
    def whole(name: str, low: int, optional: bool = False) -> str:
        v = getattr(s, name)
        if v is None and optional:
            return ""
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            return f"{name} must be an integer >= {low}" + (" or null" if optional else "")
        return ""

    def real(name: str, ok: Callable[[float], bool], what: str, optional: bool = False) -> str:
        v = getattr(s, name)
        good = isinstance(v, (int, float)) and not isinstance(v, bool) and ok(v)
        return "" if good or (v is None and optional) else f"{name} must be a number {what}"

    out = [whole("batch_size", 1), whole("grad_accum", 1), whole("seed", 0)]
    out += [whole("epochs", 1, True), whole("max_steps", 1, True)]
    out += [whole("eval_every", 1, True), whole("patience", 1, True)]
    out += [whole("warmup_steps", 0, True)]
    out += [real("lr", lambda v: v > 0, "> 0"), real("warmup", lambda v: 0 <= v <= 1, "in [0, 1]")]
    out += [real("weight_decay", lambda v: v >= 0, ">= 0")]
    out += [real("min_delta", lambda v: 0 <= v < 1, "in [0, 1) (relative)")]
    out += [real("floor", lambda v: 0 <= v <= 1, "in [0, 1]")]
    out += [real("max_grad_norm", lambda v: v > 0, "> 0", optional=True)]
    if s.decay is not None and not isinstance(s.decay, bool):
        out.append("decay must be true, false or null")
    betas_ok = (
        isinstance(s.betas, tuple)
        and len(s.betas) == 2
        and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in s.betas
        )
    )
    if not betas_ok:
        out.append("betas must be two numbers in [0, 1)")
    if s.epochs is None and s.max_steps is None:
        out.append("epochs null (train until a plateau) needs max_steps, the step cap")
    return out


def budget(settings: SGDSettings, steps_per_epoch: int) -> tuple[int, str]:
    """(total steps, the stop reason when they are all taken): the smaller of the epoch
    budget and `max_steps` ("step cap" on a tie)."""
    if settings.epochs is None:
        return settings.max_steps, STEP_CAP
    by_epochs = steps_per_epoch * settings.epochs
    if settings.max_steps is not None and settings.max_steps <= by_epochs:
        return settings.max_steps, STEP_CAP
    return by_epochs, EPOCHS
