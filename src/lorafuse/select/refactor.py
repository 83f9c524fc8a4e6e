"""Expert refactoring from an expert x task matrix (paper Section 5.1, Figure 7).

Which experts are not the best on their own task, how many experts greedy task-level
selection needs to recover the private-oracle loss and, when the matrix has the base
model's row, the experts' off-task loss relative to the base model's (`select.offtask`),
with the built-in design the library resembles.
"""

from __future__ import annotations

from typing import Any

from lorafuse.select.greedy import (
    greedy_select,
    not_best_on_own_task,
    private_oracle_loss,
)
from lorafuse.select.offtask import off_task_ratio, resembles

REPORT = "refactor.json"
PLOT = "greedy_selection.png"  # the greedy curve `lorafuse refactor` draws beside REPORT


def refactor(matrix) -> dict[str, Any]:
    """Analyse a LossMatrix: the experts not best on their own task, the greedy curve.

    The greedy target is the private-oracle loss when every task has its own expert,
    else the full-library value (each task's best expert).
    """
    L = matrix.losses.numpy()  # (N, T)
    own = matrix.own_index()
    has_own = all(i is not None for i in own)
    oracle = private_oracle_loss(L, own) if has_own else None
    sel = greedy_select(L, target=oracle)
    not_best = not_best_on_own_task(L, own) if any(i is not None for i in own) else []
    report = {
        "n_experts": len(matrix.experts),
        "n_tasks": len(matrix.tasks),
        "target": "private oracle" if has_own else "best expert per task",
        "target_loss": sel.target,
        "best_per_task_loss": float(L.min(0).mean()),
        "k_reached": sel.k_reached,
        "not_best_on_own_task": [matrix.experts[i] for i in not_best],
        "n_not_best_on_own_task": len(not_best),
        "greedy": [
            {"k": k + 1, "expert": matrix.experts[i], "loss": float(c)}
            for k, (i, c) in enumerate(zip(sel.order, sel.curve))
        ],
        "meta": matrix.meta,
    }
    off = {"ratio": None, "off_task_loss": None, "base_loss": None}
    if matrix.base is not None and any(matrix.own_tasks()):
        off = off_task_ratio(L, matrix.base, matrix.own_tasks())
    report["off_task_ratio"] = off["ratio"]
    report["off_task_loss"] = off["off_task_loss"]
    report["base_loss"] = off["base_loss"]
    n = report["n_experts"]
    report["resembles"] = resembles({
        "not_best_share": len(not_best) / n if has_own else None,
        "greedy_share": None if sel.k_reached is None else sel.k_reached / n,
        "off_task_ratio": off["ratio"],
    })  # fmt: skip
    return report
