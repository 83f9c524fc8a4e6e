"""The build's structure check: how much the experts transfer (paper Sec. 5.1).

Three statistics, each measured once on the full validation split and reused by the
build, the study's claims and the README:
- `not_best_share`: the share of private experts that are not the best expert on their
  own task (the paper: "58 out of 256 experts (about 30%)");
- `greedy_share`: the share of experts greedy task-level selection needs to recover the
  private-oracle loss (the paper: "150 of 256 experts (about 60%)");
- `off_task_ratio`: each expert's mean loss on the other tasks relative to the base
  model's (`select.offtask`), per kind (private here; the cluster experts' is added by the
  build's `offtask` stage). Near 1, experts forget little (the paper's Phi-2 experts);
  far above, they are confidently wrong off their task and every probability mixture
  pays for it.
A library whose experts transfer a lot has many of the first and needs few of the second.
The built-in presets' designs are calibrated on these three numbers only (target ranges
`NOT_BEST_RANGE`, `GREEDY_RANGE`, `OFF_TASK_RANGE`), never on which of the paper's claims
hold. Written to `structure.json` in the build folder, with the matrices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from lorafuse.formats.schema import FileModel, Finite

STRUCTURE = "structure.json"
VALIDATION_PER_TASK = None  # validation examples per task behind the matrix: all of them
NOT_BEST_RANGE = (0.15, 0.35)  # the paper: 58 of 256
GREEDY_RANGE = (0.40, 0.75)  # the paper: 150 of 256
OFF_TASK_RANGE = (0.0, 1.10)  # experts that forget little: within 10% of the base model
PAPER = {"not_best_share": 58 / 256, "greedy_share": 150 / 256}
PAPER_WORDS = {
    "not_best_share": "58 out of 256 experts (about 30%)",
    "greedy_share": "150 of 256 experts (about 60%)",
}


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
        "off_task_ratio": inside(stats.get("off_task_ratio"), OFF_TASK_RANGE),
    }


def off_task(matrix, base: list[float]) -> dict[str, Any]:
    """`select.offtask.off_task_ratio` of a LossMatrix (each expert's own tasks from its
    `own` map), rounded for the reports."""
    from lorafuse.select.offtask import off_task_ratio

    r = off_task_ratio(matrix.losses.numpy(), base, matrix.own_tasks())
    out = {k: (None if v is None else round(v, 4)) for k, v in r.items() if k != "per_expert"}
    out["per_expert"] = dict(
        zip(matrix.experts, [None if v is None else round(v, 4) for v in r["per_expert"]])
    )
    return out


def _workspace(root: Path, tasks: list[str], settings):
    from lorafuse.spec import load_spec
    from lorafuse.workspace import Workspace

    spec = load_spec(root).model_copy(update={"tasks": list(tasks)})
    spec = spec.model_copy(update={"batch_size": settings.eval_batch_size})
    return Workspace(spec)


def _matrix(ws, kind: str, stage: str, report):
    from lorafuse.matrix import expert_task_matrix

    total = len(ws.library(kind)) * len(ws.examples("validation", VALIDATION_PER_TASK))
    done = [0]

    def progress(k: int) -> None:  # k expert-examples more
        done[0] += k
        report(stage, min(done[0], total), total)

    report(stage, 0, total)
    m = expert_task_matrix(ws, kind, "validation", VALIDATION_PER_TASK, progress=progress)
    report(stage, total, total)
    return m


def measure_structure(root: Path, tasks: list[str], settings, report=None) -> dict[str, Any]:
    """Loss matrix of the private experts and the base model's losses on the full
    validation split -> `root/structure.json`.

    Returns the statistics (see `structure_stats`, plus `off_task_ratio` and `kinds`:
    {"private": the `off_task` statistics}) and whether they are in range.
    """
    from lorafuse.io import write_json
    from lorafuse.methods.run import base_task_losses
    from lorafuse.select.refactor import refactor

    report = report or (lambda stage, done, total: None)
    ws = _workspace(root, tasks, settings)
    matrix = _matrix(ws, "private", "structure", report)
    base = base_task_losses(ws, matrix.tasks, "validation", VALIDATION_PER_TASK)
    private = off_task(matrix, base)
    stats = {**structure_stats(refactor(matrix)), "off_task_ratio": private["ratio"]}
    saved = {
        **stats,
        "kinds": {"private": {k: v for k, v in private.items() if k != "per_expert"}},
        "in_range": in_range(stats),
        "target_ranges": {
            "not_best_share": list(NOT_BEST_RANGE),
            "greedy_share": list(GREEDY_RANGE),
            "off_task_ratio": list(OFF_TASK_RANGE),
        },
        "paper": PAPER,
        "paper_words": PAPER_WORDS,
        "split": "validation",
        "max_examples_per_task": VALIDATION_PER_TASK,
        "base_losses": dict(zip(matrix.tasks, base)),
        "off_task_per_expert": {"private": private["per_expert"]},
        "matrix": matrix.to_dict(),
    }
    write_json(Path(root) / STRUCTURE, saved)
    return {k: v for k, v in saved.items() if k not in SAVED_ONLY}


class StructureFile(FileModel):
    """structure.json as the build's offtask stage reads it back (other fields kept)."""

    base_losses: dict[str, Finite]
    kinds: dict[str, dict[str, Any]]
    off_task_per_expert: dict[str, Any]
    matrices: dict[str, Any] = Field(default_factory=dict)


SAVED_ONLY = ("matrix", "matrices", "base_losses", "off_task_per_expert")


def measure_kind(root: Path, tasks: list[str], settings, kind: str, report=None) -> dict:
    """The off-task statistics of the experts of `kind` (e.g. the cluster experts) on the
    full validation split, added to `root/structure.json` (`kinds`, and the matrix under
    `matrices`); returns them. LorafuseError if the structure stage has not run."""
    from lorafuse.errors import FileFormatError, LorafuseError
    from lorafuse.formats.schema import check, read_json
    from lorafuse.io import write_json

    path = Path(root) / STRUCTURE
    if not path.is_file():
        raise LorafuseError(f"{path} is missing: run the build's structure stage first")
    saved = read_json(path, what="build structure")
    check(saved, StructureFile, path, what="build structure")
    report = report or (lambda stage, done, total: None)
    ws = _workspace(root, tasks, settings)
    matrix = _matrix(ws, kind, "offtask", report)
    gone = [t for t in matrix.tasks if t not in saved["base_losses"]]
    if gone:
        raise FileFormatError(
            f"build structure: {path}: field 'base_losses': missing task(s) {gone[:5]}; "
            "rebuild with --force"
        )
    base = [saved["base_losses"][t] for t in matrix.tasks]
    stats = off_task(matrix, base)
    saved["kinds"][kind] = {k: v for k, v in stats.items() if k != "per_expert"}
    saved["off_task_per_expert"][kind] = stats["per_expert"]
    saved.setdefault("matrices", {})[kind] = matrix.to_dict()
    write_json(path, saved)
    return saved["kinds"][kind]
