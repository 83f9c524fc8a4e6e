"""The one learning-rate schedule: linear warm-up, then cosine decay (or constant).

The one training loop (`fit.sgd.train`) follows it for every trainer: the coefficient
fits (warm-up as a fraction of the budget, cosine to 0 or constant after the warm-up),
the experts and the base model of the built-in benchmark (warm-up in steps, cosine to a
floor of 0.1). `warmup_cosine` is the same schedule for torch's LambdaLR, as the plain
PEFT trainers that tests and benches compare against use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.0, decay: bool = True) -> float:
    """Learning-rate factor at `step` (0-based) of `total`: (step + 1) / warmup over the
    first `warmup` steps, then a cosine from 1 down to `floor` at `total` (without
    `decay`: constant 1). `warmup` 0 starts the cosine at step 0."""
    if step < warmup:
        return (step + 1) / warmup
    if not decay:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(fraction: float, total: int) -> int:
    """Warm-up steps of a warm-up given as a fraction of `total` steps (at least one)."""
    return max(1, int(round(fraction * total)))


def warmup_cosine(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """`lr_factor` as a function of the step (for torch's LambdaLR): `warmup` steps of
    linear warm-up, then a cosine down to `floor` at `total`."""
    return partial(lr_factor, total=total, warmup=warmup, floor=floor)
