"""Every expert's log-probability of every target token: one batched pass, cached on disk.

Each batch of B examples is repeated for n experts at once (n*B rows, each row with
one-hot coefficients on its expert through the fused layer), so N experts cost N/n
forwards instead of N model loads and passes. Under `accelerate launch` every process
runs its share of each chunk's batches (lorafuse.parallel), all get the whole chunk, and
the main process saves it. The result feeds the expert x task
matrix, the exact ensemble solver and the sparse ensemble search.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from lorafuse.ensemble import chunks, coefficient_rows
from lorafuse.evaluate import target_logprobs
from lorafuse.io import atomic_file
from lorafuse.model import attached
from lorafuse.parallel import map_sharded, once


@dataclass
class TargetLogprobs:
    """logp[k, i]: expert i's log-probability of target token k."""

    logp: Tensor  # (K, N) fp32
    example: Tensor  # (K,) long: the example of each token
    tasks: list[str]  # (M,) the task of each example
    experts: list[str]  # (N,)

    def example_nll(self) -> Tensor:
        """Per-example mean NLL of each expert: (N, M)."""
        M = len(self.tasks)
        sums = torch.zeros(M, self.logp.shape[1], dtype=torch.float64)
        sums.index_add_(0, self.example, -self.logp.double())  # (M, N)
        counts = torch.bincount(self.example, minlength=M).double()  # (M,)
        return (sums / counts[:, None]).T.float()

    def token_weights(self) -> Tensor:
        """Weights (K,) of the paper's mean: per example over tokens, per task, over tasks.

        They are positive and sum to 1, so sum_k w_k nll_k is the evaluation's loss.
        """
        from lorafuse.evaluate import token_weights

        names = sorted(set(self.tasks))
        task_id = torch.tensor([names.index(t) for t in self.tasks])  # (M,)
        return token_weights(task_id[self.example], self.example)  # (K,)


def expert_target_logprobs(
    ws,
    kind: str,
    split: str,
    max_per_task: int | None = None,
    rows_per_pass: int = 256,
    cache_dir: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> TargetLogprobs:
    """Target-token log-probabilities of every expert of `kind` on `split`.

    Chunks of n = max(1, rows_per_pass // batch rows) experts share each forward. With
    `cache_dir`, each finished chunk is saved and reused by a later run with the same
    settings (an interrupted run resumes). `progress(k)` counts expert-examples done.
    """
    lib = ws.library(kind)
    N = len(lib)
    batches = ws.batches(split, max_per_task)
    tasks = [t for b in batches for t in b.tasks]
    size = max(len(b.tasks) for b in batches)
    cache = _cache_folder(cache_dir, ws, kind, split, max_per_task, lib.names, tasks)
    plan = list(chunks(list(range(N)), size, rows_per_pass))
    files = [cache / f"chunk_{c[0]:05d}_{len(c)}.pt" if cache else None for c in plan]
    # the saved chunks, read by the main process (so that every process agrees) and sent
    saved = once(lambda: [_load_chunk(f, len(c)) if f else None for f, c in zip(files, plan)])
    starts = [sum(len(b.tasks) for b in batches[:i]) for i in range(len(batches))]
    done: dict[int, Tensor] = {}
    example = None
    eye = torch.eye(N)
    with attached(ws.model, lib, "factors") as fusion:

        @torch.inference_mode()
        def one(chunk: list[int], i: int) -> tuple[Tensor, Tensor]:
            # batch i for every expert of `chunk`: (k, n) log-probs, (k,) example rows
            b = batches[i]
            B = len(b.tasks)
            t = {k: v.to(ws.device).repeat(len(chunk), 1) for k, v in b.tensors.items()}
            fusion.set_coefficients(coefficient_rows(eye[chunk], B))  # (n*B, N)
            logits = ws.logits(t)  # (n*B, T, V)
            logp, mask = target_logprobs(logits, t["labels"])  # (n*B, T-1)
            logp = logp.view(len(chunk), B, -1).cpu()  # (n, B, T-1)
            mask = mask.view(len(chunk), B, -1)[0].cpu()  # (B, T-1)
            if progress:
                progress(len(chunk) * B)
            # (k, n): tokens in row-major order; (k,) their examples
            return logp[:, mask].T, torch.nonzero(mask)[:, 0] + starts[i]

        for chunk, file, hit in zip(plan, files, saved):
            c0 = chunk[0]
            if hit is not None:
                done[c0], example = hit
                if progress:
                    progress(len(chunk) * len(tasks))
                continue
            parts = map_sharded(lambda i, chunk=chunk: one(chunk, i), range(len(batches)))
            done[c0] = torch.cat([p for p, _ in parts])  # (K, n)
            example = torch.cat([r for _, r in parts])  # (K,)
            if file is not None:  # the main process writes; its error stops every process
                once(partial(_save_chunk, file, done[c0], example))
    logp = torch.cat([done[c] for c in sorted(done)], dim=1).float()  # (K, N)
    return TargetLogprobs(logp, example, tasks, lib.names)


def _save_chunk(file: Path, logp: Tensor, example: Tensor) -> None:
    with atomic_file(file) as tmp:
        torch.save((logp, example), tmp)


def _load_chunk(file: Path, n: int) -> tuple[Tensor, Tensor] | None:
    # A saved chunk ((K, n) log-probs, (K,) example rows), or None when it is missing,
    # torn or of another shape: that chunk is then computed again and saved over it.
    if not file.is_file():
        return None
    try:
        logp, example = torch.load(file, weights_only=True)
    except Exception:
        return None
    ok = isinstance(logp, Tensor) and isinstance(example, Tensor) and logp.dim() == 2
    return (logp, example) if ok and logp.shape == (len(example), n) else None


def _cache_folder(cache_dir, ws, kind, split, max_per_task, names, tasks) -> Path | None:
    if cache_dir is None:
        return None
    key = json.dumps(
        [kind, split, max_per_task, names, tasks, ws.spec.max_length, ws.spec.batch_size,
         str(ws.dtype), ws.base_id],
        sort_keys=True,
    )  # fmt: skip
    return Path(cache_dir) / hashlib.sha256(key.encode()).hexdigest()[:16]  # made on writing
