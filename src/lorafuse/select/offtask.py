"""How an expert behaves off its own tasks: its loss there relative to the base model's.

For expert i with own tasks O_i, on a loss matrix L (N experts, T tasks) and the base
model's per-task losses b (T,):

    ratio_i = mean_{t not in O_i} L[i, t] / b[t]

and the library's off-task ratio is the mean of ratio_i over its experts. Below 1 an
expert transfers (it helps on tasks it was not trained on); far above 1 it is confidently
wrong there, which every probability mixture of experts pays for. LoRA experts trained
gently from a strong base stay near 1 (Biderman et al. 2024, "LoRA Learns Less and
Forgets Less").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lorafuse.errors import LorafuseError
from lorafuse.matrix import as_loss_matrix


def off_task_ratio(L, base: Sequence[float], own: Sequence[set[int]]) -> dict[str, Any]:
    """The off-task statistics of losses L (N, T) against the base losses (T,).

    `own[i]` holds the task columns expert i was trained on. Returns {"ratio" (mean over
    experts of ratio_i, None when no expert has an off-task column), "per_expert" (ratio_i,
    None for an expert trained on every task), "off_task_loss" and "base_loss" (the means
    of L[i, t] and b[t] over the same (i, t) pairs), "own_loss" (the mean of each expert's
    mean loss on its own tasks)}. Raises LorafuseError on mismatched shapes or a base loss
    that is not positive.
    """
    M = as_loss_matrix(L)  # (N, T)
    b = np.asarray(base, dtype=float)  # (T,)
    N, T = M.shape
    if b.shape != (T,) or len(own) != N:
        raise LorafuseError(
            f"off-task ratio: base losses {b.shape} and own tasks ({len(own)}) must match the "
            f"matrix's {T} tasks and {N} experts"
        )
    if not np.isfinite(b).all() or (b <= 0).any():
        raise LorafuseError("off-task ratio: the base model's losses must be finite and > 0")
    per_expert: list[float | None] = []
    pairs, own_means = [], []
    for i in range(N):
        off = [t for t in range(T) if t not in own[i]]
        if own[i]:
            own_means.append(float(M[i, sorted(own[i])].mean()))
        if not off:
            per_expert.append(None)
            continue
        per_expert.append(float((M[i, off] / b[off]).mean()))
        pairs += [(i, t) for t in off]
    ratios = [r for r in per_expert if r is not None]
    return {
        "ratio": float(np.mean(ratios)) if ratios else None,
        "per_expert": per_expert,
        "off_task_loss": float(np.mean([M[i, t] for i, t in pairs])) if pairs else None,
        "base_loss": float(np.mean([b[t] for _, t in pairs])) if pairs else None,
        "own_loss": float(np.mean(own_means)) if own_means else None,
    }


# The three statistics of the built-in library's designs (`lorafuse benchmark build
# --preset small-<design>`, seed 0, full validation split, private experts), as the
# README's regime comparison measured them; a user's library is placed beside them.
DESIGN_STATISTICS: dict[str, dict[str, float]] = {
    "transfer": {"not_best_share": 0.2188, "greedy_share": 0.625, "off_task_ratio": 2.8892},
    "interference": {"not_best_share": 0.0, "greedy_share": 1.0, "off_task_ratio": 2.9493},
    "replay": {"not_best_share": 0.2188, "greedy_share": 0.4688, "off_task_ratio": 1.0678},
}
# The paper's Phi-2 library: 58 of 256 not best on their own task, 150 of 256 for greedy;
# its off-task ratio is not printed: LoRA experts of a strong base forget little, about 1.
PAPER_STATISTICS = {"not_best_share": 58 / 256, "greedy_share": 150 / 256, "off_task_ratio": 1.0}


def distance(a: dict[str, float | None], b: dict[str, float | None]) -> float:
    """How far two libraries' statistics lie apart: the Euclidean distance over the two
    shares and the log off-task ratio (a statistic missing on either side is left out)."""
    d = 0.0
    for key in ("not_best_share", "greedy_share", "off_task_ratio"):
        x, y = a.get(key), b.get(key)
        if x is None or y is None or (key == "off_task_ratio" and min(x, y) <= 0):
            continue
        d += (np.log(x / y) if key == "off_task_ratio" else x - y) ** 2
    return float(np.sqrt(d))


def resembles(stats: dict[str, float | None]) -> str:
    """One line: which design of the built-in regime comparison `stats` lies closest to."""
    design = min(DESIGN_STATISTICS, key=lambda k: distance(stats, DESIGN_STATISTICS[k]))
    d = DESIGN_STATISTICS[design]
    return (
        f"closest built-in design: {design} (not best {d['not_best_share']:.0%}, greedy "
        f"{d['greedy_share']:.0%}, off-task ratio {d['off_task_ratio']:.2f}); see the README's "
        "regime comparison for which of the paper's conclusions held there"
    )
