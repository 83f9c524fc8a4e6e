"""The one check of numbers a user hands in: coefficients, weights, probabilities, losses.

`check_values` refuses a tensor or array of the wrong shape or holding NaN or Inf, naming
what it is, what was expected, the offending shape or values, and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from lorafuse.errors import LorafuseError

Shape = tuple[int | None, ...]  # an int: that size; None: any size of at least 1
_SHOWN = 8  # at most this many values are quoted in a message; more are shown by shape


def check_values(
    values: Tensor | np.ndarray,
    what: str,
    shapes: Sequence[Shape],
    expected: str,
    fix: str,
    axes: Sequence[str] | None = None,
) -> None:
    """Raise LorafuseError unless `values` has one of `shapes` and is finite throughout.

    `what` names the values ("merge weights"), `expected` says the shapes in words ("4
    numbers (one per expert)"), `fix` what to do instead. A wrong shape is reported with
    the values themselves when there are few (else the shape); a NaN or Inf with the index
    of the first, by axis name when `axes` is given (("expert", "task") -> "expert 0,
    task 1"). Works on tensors of any dtype and device and on numpy arrays.
    """
    t = torch.as_tensor(values).detach()
    if not any(_fits(tuple(t.shape), s) for s in shapes):
        got = t.tolist() if t.numel() <= _SHOWN else f"shape {tuple(t.shape)}"
        raise LorafuseError(f"{what} must be {expected}; got {got}; {fix}")
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = [int(i) for i in bad.nonzero()[0]]
        where = ", ".join(f"{a} {i}" for a, i in zip(axes, first)) if axes else f"index {first}"
        value = t[tuple(first)].item()
        raise LorafuseError(f"NaN or Inf in {what} (first at {where}: {value}); {fix}")


def _fits(shape: tuple[int, ...], want: Shape) -> bool:
    return len(shape) == len(want) and all(
        n >= 1 if w is None else n == w for n, w in zip(shape, want)
    )
