"""The expert x task loss matrix, from one batched, cached and resumable pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from lorafuse.cache import expert_target_logprobs
from lorafuse.errors import FileFormatError, LorafuseError
from lorafuse.formats.schema import Count, FileModel, Finite, check, read_json
from lorafuse.io import write_json
from lorafuse.values import check_values


def as_loss_matrix(L, what: str = "loss matrix") -> np.ndarray:
    """L (N experts, T tasks) as a finite float64 numpy array; LorafuseError otherwise."""
    try:
        M = np.asarray(L.detach().cpu() if hasattr(L, "detach") else L, dtype=float)
    except (TypeError, ValueError) as e:
        raise LorafuseError(f"the {what} must be numeric (N experts, T tasks): {e}") from None
    check_values(
        M,
        f"the {what}",
        [(None, None)],
        "2-D (N experts, T tasks) and non-empty",
        "give one finite loss per expert and task (re-evaluate an expert or drop a task)",
        axes=("expert", "task"),
    )
    return M


class MatrixFile(FileModel):
    """A matrix file as `LossMatrix.load` reads it (see `LossMatrix.to_dict`)."""

    experts: list[str]
    tasks: list[str]
    losses: list[list[Finite]]  # (N, T)
    n_examples: list[Count]  # (T,)
    own: dict[str, str] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)
    base: list[Finite] | None = None  # (T,)


@dataclass
class LossMatrix:
    """losses[i, t]: expert i's mean per-example NLL on task t."""

    losses: Tensor  # (N, T)
    experts: list[str]
    tasks: list[str]
    n_examples: list[int]
    own: dict[str, str] = field(default_factory=dict)  # task -> its own expert, when known
    meta: dict[str, Any] = field(default_factory=dict)
    base: list[float] | None = None  # (T,) the base model's loss on each task, when measured

    def own_index(self) -> list[int | None]:
        """For each task, the row of its own expert (None when unknown)."""
        pos = {e: i for i, e in enumerate(self.experts)}
        return [pos.get(self.own.get(t, "")) for t in self.tasks]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the matrix file's schema)."""
        return {
            "experts": self.experts,
            "tasks": self.tasks,
            "losses": self.losses.tolist(),
            "n_examples": self.n_examples,
            "own": self.own,
            "meta": self.meta,
            **({"base": self.base} if self.base is not None else {}),
        }

    def save(self, path: str | Path, force: bool = True) -> Path:
        """Write the matrix as JSON (atomically)."""
        return write_json(path, self.to_dict(), force=force)

    @classmethod
    def load(cls, path: str | Path) -> LossMatrix:
        """Read a matrix file; raises LorafuseError (FileFormatError) naming the file and
        the field for a missing, truncated or malformed one."""
        return cls.from_dict(read_json(path, what="matrix file"), path)

    @classmethod
    def from_dict(cls, d: Any, source: str | Path) -> LossMatrix:
        """Inverse of `to_dict`, checked: typed fields, finite losses, consistent shapes.

        Raises FileFormatError naming `source` (the file `d` was read from) and the field.
        """
        f = check(d, MatrixFile, source, what="matrix file")
        N, T = len(f.experts), len(f.tasks)
        sizes = {
            "losses": ([len(r) for r in f.losses], [T] * N),  # one row of T per expert
            "n_examples": (len(f.n_examples), T),
            "base": (T if f.base is None else len(f.base), T),
        }
        for name, (got, want) in sizes.items():
            if got != want:
                raise FileFormatError(
                    f"matrix file: {source}: field {name!r}: expected {want} value(s) for "
                    f"{N} experts x {T} tasks, got {got}"
                )
        losses = torch.tensor(f.losses, dtype=torch.float64).reshape(N, T)
        m = cls(losses, f.experts, f.tasks, f.n_examples, f.own, f.meta)
        m.base = None if f.base is None else [float(x) for x in f.base]
        return m

    def own_tasks(self) -> list[set[int]]:
        """For each expert, the task columns it is the own expert of (from `own`)."""
        col = {t: j for j, t in enumerate(self.tasks)}
        out: list[set[int]] = [set() for _ in self.experts]
        pos = {e: i for i, e in enumerate(self.experts)}
        for t, e in self.own.items():
            if t in col and e in pos:
                out[pos[e]].add(col[t])
        return out


def example_losses(
    ws,
    kind: str,
    split: str,
    max_per_task: int | None = None,
    rows_per_pass: int = 256,
    cache_dir: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[Tensor, list[str]]:
    """Per-example mean NLL of every expert: (N, M), and the task of each example (M,).

    One batched, cached pass over the experts (see `cache.expert_target_logprobs`).
    """
    cached = expert_target_logprobs(
        ws, kind, split, max_per_task, rows_per_pass, cache_dir, progress
    )
    return cached.example_nll(), cached.tasks


def expert_task_matrix(
    ws,
    kind: str,
    split: str = "validation",
    max_per_task: int | None = None,
    rows_per_pass: int = 256,
    cache_dir: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> LossMatrix:
    """The (N experts, T tasks) loss matrix of one expert kind on one split."""
    lib = ws.library(kind)
    losses, tasks = example_losses(
        ws, kind, split, max_per_task, rows_per_pass, cache_dir, progress
    )
    names = sorted(set(tasks))
    index: dict[str, list[int]] = {t: [] for t in names}
    for m, t in enumerate(tasks):
        index[t].append(m)
    cols = [losses[:, index[t]].double().mean(1) for t in names]  # each (N,)
    try:
        own = ws.task_map(kind)
    except LorafuseError:
        own = {}
    meta = {"split": split, "experts_kind": kind, "max_examples_per_task": max_per_task}
    return LossMatrix(
        torch.stack(cols, 1), lib.names, names, [len(index[t]) for t in names], own, meta
    )
