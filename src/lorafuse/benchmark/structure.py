"""The build's structure check: how much the private experts transfer (paper Sec. 5.1).

Two statistics of the expert x task loss matrix on the validation split, the ones the
paper reports for its 256 Flan experts:
- `not_best_share`: the share of private experts that are not the best expert on their
  own task (the paper: 58 of 256, 23%);
- `greedy_share`: the share of experts greedy task-level selection needs to recover the
  private-oracle loss (the paper: 150 of 256, 59%).
A library whose experts transfer a lot has many of the first and needs few of the second.
The built-in presets' generators are calibrated on these two numbers only (their target
ranges are `NOT_BEST_RANGE` and `GREEDY_RANGE`), never on which of the paper's claims hold.
Written to `structure.json` in the build folder, with the matrix itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

STRUCTURE = "structure.json"
VALIDATION_PER_TASK = 32  # validation examples per task behind the matrix
NOT_BEST_RANGE = (0.15, 0.35)  # the paper: 0.23
GREEDY_RANGE = (0.40, 0.75)  # the paper: 0.59
PAPER = {"not_best_share": 58 / 256, "greedy_share": 150 / 256}


def structure_stats(refactor_report: dict[str, Any]) -> dict[str, Any]:
    """The two shares (and their counts) from a `select.refactor.refactor` report."""
    n = refactor_report["n_experts"]
    k = refactor_report["k_reached"]
    not_best = refactor_report["n_not_best_on_own_task"]
    return {
        "experts": n,
        "not_best_on_own_task": not_best,
        "not_best_share": round(not_best / n, 4),
        "greedy_experts": k,
        "greedy_share": None if k is None else round(k / n, 4),
        "not_best_experts": refactor_report["not_best_on_own_task"],
    }


def in_range(stats: dict[str, Any]) -> dict[str, bool]:
    """Whether each share lies in its target range (a missing share is not)."""

    def inside(x, lo_hi) -> bool:
        return x is not None and lo_hi[0] <= x <= lo_hi[1]

    return {
        "not_best_share": inside(stats.get("not_best_share"), NOT_BEST_RANGE),
        "greedy_share": inside(stats.get("greedy_share"), GREEDY_RANGE),
    }


def measure_structure(root: Path, tasks: list[str], settings, report=None) -> dict[str, Any]:
    """Loss matrix of the private experts on validation -> `root/structure.json`.

    Returns the statistics (see `structure_stats`) and whether they are in range.
    """
    from lorafuse.io import write_json
    from lorafuse.matrix import expert_task_matrix
    from lorafuse.select.refactor import refactor
    from lorafuse.spec import load_spec
    from lorafuse.workspace import Workspace

    report = report or (lambda stage, done, total: None)
    spec = load_spec(root).model_copy(update={"tasks": list(tasks)})
    spec = spec.model_copy(update={"batch_size": settings.eval_batch_size})
    ws = Workspace(spec)
    total = len(ws.library("private")) * len(ws.examples("validation", VALIDATION_PER_TASK))
    done = [0]

    def progress(k: int) -> None:  # k expert-examples more
        done[0] += k
        report("structure", min(done[0], total), total)

    report("structure", 0, total)
    matrix = expert_task_matrix(ws, "private", "validation", VALIDATION_PER_TASK, progress=progress)
    stats = structure_stats(refactor(matrix))
    report("structure", total, total)
    saved = {
        **stats,
        "in_range": in_range(stats),
        "target_ranges": {
            "not_best_share": list(NOT_BEST_RANGE),
            "greedy_share": list(GREEDY_RANGE),
        },
        "paper": PAPER,
        "split": "validation",
        "max_examples_per_task": VALIDATION_PER_TASK,
        "matrix": matrix.to_dict(),
    }
    write_json(Path(root) / STRUCTURE, saved)
    return {k: v for k, v in saved.items() if k != "matrix"}
