"""The expert x task loss matrix, many experts per batched forward, cached and resumable.

Each batch of B examples is repeated for n experts at once (n*B rows, each row with
one-hot coefficients on its expert through the fused layer), so N experts cost N/n
forwards of n*B rows instead of N separate model loads and passes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorafuse.errors import LorafuseError
from lorafuse.evaluate import target_nll
from lorafuse.io import write_json
from lorafuse.model import attach


@dataclass
class LossMatrix:
    """losses[i, t]: expert i's mean per-example NLL on task t."""

    losses: Tensor  # (N, T)
    experts: list[str]
    tasks: list[str]
    n_examples: list[int]
    own: dict[str, str] = field(default_factory=dict)  # task -> its own expert, when known
    meta: dict[str, Any] = field(default_factory=dict)

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
        }

    def save(self, path: str | Path, force: bool = True) -> Path:
        """Write the matrix as JSON (atomically)."""
        return write_json(path, self.to_dict(), force=force)

    @classmethod
    def load(cls, path: str | Path) -> LossMatrix:
        """Read a matrix file; raises LorafuseError for a malformed one."""
        try:
            d = json.loads(Path(path).read_text())
            losses = torch.tensor(d["losses"], dtype=torch.float64)
            m = cls(losses, d["experts"], d["tasks"], d["n_examples"], d.get("own", {}))
            m.meta = d.get("meta", {})
        except FileNotFoundError:
            raise LorafuseError(f"matrix file {path} does not exist") from None
        except (KeyError, ValueError, TypeError) as e:
            raise LorafuseError(f"{path} is not a lorafuse matrix file ({e})") from None
        if tuple(losses.shape) != (len(m.experts), len(m.tasks)):
            raise LorafuseError(f"{path}: losses shape {tuple(losses.shape)} != experts x tasks")
        if not torch.isfinite(losses).all():
            raise LorafuseError(f"{path}: the loss matrix holds NaN or Inf")
        return m


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

    Chunks of n = max(1, rows_per_pass // batch_size) experts share each forward. With
    `cache_dir`, each finished chunk is saved and reused by a later run with the same
    settings (an interrupted run resumes). `progress(k)` counts expert-examples done.
    """
    lib = ws.library(kind)
    N = len(lib)
    batches = ws.batches(split, max_per_task)
    tasks = [t for b in batches for t in b.tasks]
    M = len(tasks)
    size = max(len(b.tasks) for b in batches)
    n = max(1, min(N, rows_per_pass // size))
    cache = _cache_folder(cache_dir, ws, kind, split, max_per_task, lib.names, tasks)
    out = torch.empty(N, M)
    fusion = attach(ws.model, lib, "factors")
    eye = torch.eye(N)
    try:
        for c0 in range(0, N, n):
            chunk = list(range(c0, min(N, c0 + n)))
            file = cache / f"chunk_{c0:05d}_{len(chunk)}.pt" if cache else None
            if file is not None and file.exists():
                out[chunk] = torch.load(file, weights_only=True)
                if progress:
                    progress(len(chunk) * M)
                continue
            r0 = 0
            for b in batches:
                B = len(b.tasks)
                t = {k: v.to(ws.device).repeat(len(chunk), 1) for k, v in b.tensors.items()}
                fusion.set_coefficients(eye[chunk].repeat_interleave(B, 0))  # (n*B, N)
                with torch.inference_mode():
                    logits = ws.model(
                        input_ids=t["input_ids"], attention_mask=t["attention_mask"]
                    ).logits  # (n*B, T, V)
                    s, c = target_nll(logits, t["labels"])  # (n*B,)
                out[chunk, r0 : r0 + B] = (s / c).view(len(chunk), B).cpu().float()
                r0 += B
                if progress:
                    progress(len(chunk) * B)
            if file is not None:
                tmp = file.with_suffix(".tmp")
                torch.save(out[chunk].clone(), tmp)
                tmp.replace(file)
    finally:
        fusion.detach()
    return out, tasks


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


def _cache_folder(cache_dir, ws, kind, split, max_per_task, names, tasks) -> Path | None:
    if cache_dir is None:
        return None
    key = json.dumps(
        [kind, split, max_per_task, names, tasks, ws.spec.max_length, ws.spec.batch_size,
         str(ws.dtype), ws.base_id],
        sort_keys=True,
    )  # fmt: skip
    folder = Path(cache_dir) / hashlib.sha256(key.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return folder
