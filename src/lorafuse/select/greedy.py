"""Greedy task-level expert selection (paper Sec. 5.1 and B.6, Figure 7).

With a loss matrix L (N experts x T tasks, lower is better) and task-level routing, a subset
S of experts scores mean_t min_{i in S} L_it: each task uses the best expert in S. Greedy
selection starts from the best single expert and repeatedly adds the expert that lowers that
score most. The paper finds 150 of 256 experts recover the private-oracle validation loss,
and 58 of 256 experts are not the best on their own task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorafuse.errors import LorafuseError
from lorafuse.matrix import as_loss_matrix


@dataclass
class GreedySelection:
    """Result of `greedy_select`."""

    order: list[int]  # (K,) expert indices in the order added
    curve: np.ndarray  # (K,) mean task loss with the first k experts, k = 1..K
    target: float  # the loss the curve was asked to reach
    k_reached: int | None  # smallest k with curve[k - 1] <= target + tol (None: not in K)


def greedy_select(
    L, k_max: int | None = None, target: float | None = None, tol: float = 1e-9
) -> GreedySelection:
    """Greedy forward selection of experts for task-level routing on losses L (N, T).

    Starts from the expert with the lowest mean loss, then adds, for k = 2..k_max (default N),
    the expert that most lowers mean_t min_{i in S} L_it; ties go to the lowest index.
    `target` defaults to the full-library value mean_t min_i L_it (pass
    `private_oracle_loss(L, own)` for the paper's criterion). Raises LorafuseError for a
    matrix that is not 2-D and finite, or k_max outside 1..N.
    """
    L = as_loss_matrix(L)  # (N, T)
    N = L.shape[0]
    k_max = N if k_max is None else k_max
    if not 1 <= k_max <= N:
        raise LorafuseError(f"k_max={k_max} must lie in 1..{N} (the number of experts)")
    target = float(L.min(0).mean()) if target is None else float(target)
    first = int(np.argmin(L.mean(1)))
    best = L[first].copy()  # (T,) best loss so far on each task
    order, curve = [first], [float(best.mean())]
    chosen = np.zeros(N, dtype=bool)
    chosen[first] = True
    for _ in range(1, k_max):
        scores = np.minimum(best[None, :], L).mean(1)  # (N,) score after adding each expert
        scores[chosen] = np.inf
        j = int(np.argmin(scores))
        best = np.minimum(best, L[j])
        chosen[j] = True
        order.append(j)
        curve.append(float(best.mean()))
    curve_arr = np.asarray(curve)  # (K,)
    hit = np.flatnonzero(curve_arr <= target + tol)
    k_reached = int(hit[0]) + 1 if len(hit) else None
    return GreedySelection(order, curve_arr, target, k_reached)


def private_oracle_loss(L, own: Sequence[int]) -> float:
    """mean_t L[own[t], t]: each task routed to its own expert (the private oracle).

    `own` (T,) gives each task's own expert. Raises LorafuseError when a task has no own
    expert (None) or an index is out of range.
    """
    L = as_loss_matrix(L)
    idx = _own(own, L.shape)
    if (idx < 0).any():
        missing = np.flatnonzero(idx < 0).tolist()
        raise LorafuseError(
            f"tasks {missing} have no own expert; the private oracle needs one per task"
        )
    return float(L[idx, np.arange(L.shape[1])].mean())


def not_best_on_own_task(L, own: Sequence[int | None]) -> list[int]:
    """Experts that are not the best (lowest loss, ties counted as best) on their own task.

    L (N, T); own (T,): own[t] is the index of task t's own expert, or None when the task has
    none (it is then skipped). Returns sorted expert indices (the paper's '58 of 256').
    Raises LorafuseError when own has the wrong length or an index is out of range.
    """
    L = as_loss_matrix(L)
    idx = _own(own, L.shape)  # (T,), -1 where none
    tasks = np.flatnonzero(idx >= 0)  # (T',)
    experts = idx[tasks]  # (T',)
    worse = L[experts, tasks] > L[:, tasks].min(0)  # (T',)
    return sorted(set(experts[worse].tolist()))


def _own(own: Sequence[int | None], shape: tuple[int, int]) -> np.ndarray:
    N, T = shape
    if len(own) != T:
        raise LorafuseError(f"own has {len(own)} entries but the loss matrix has {T} tasks")
    bad = [o for o in own if o is not None and not 0 <= int(o) < N]
    if bad:
        raise LorafuseError(f"own holds expert indices outside 0..{N - 1}: {bad}")
    return np.array([-1 if o is None else int(o) for o in own], dtype=np.int64)  # (T,)
