"""Baselines and static merges: base, oracle, shared, single:<expert>, merge-uniform(-full)."""

from __future__ import annotations

import torch

from lorafuse.methods.registry import Method, Prepared, register
from lorafuse.model import attach


def _logits(ws, batch):
    return ws.logits(batch.tensors)


def _fused(ws, kind: str, space: str, setup) -> Prepared:
    library = ws.library(kind)
    fusion = attach(ws.model, library, space)
    try:
        setup(fusion)
    except BaseException:
        fusion.detach()
        raise
    return Prepared(lambda b: _logits(ws, b), fusion.detach, info={"experts": kind})


def prepare_base(ws, kind, arg) -> Prepared:
    return Prepared(lambda b: _logits(ws, b))


def prepare_oracle(ws, kind, arg) -> Prepared:
    library = ws.library(kind)
    mapping = ws.task_map(kind, ws.tasks)
    index = {t: library.index([e])[0] for t, e in mapping.items()}
    fusion = attach(ws.model, library, "factors")
    eye = torch.eye(len(library))

    def forward(batch):
        rows = torch.tensor([index[t] for t in batch.tasks])
        fusion.set_coefficients(eye[rows])  # (B, N): each row its task's expert
        return _logits(ws, batch)

    return Prepared(forward, fusion.detach, info={"experts": kind})


def prepare_shared(ws, kind, arg) -> Prepared:
    return _fused(ws, "shared", "factors", lambda f: f.set_expert(0))


def prepare_single(ws, kind, arg) -> Prepared:
    return _fused(ws, kind, "factors", lambda f: f.set_expert(arg))


def prepare_merge_uniform(ws, kind, arg) -> Prepared:
    return _fused(ws, kind, "factors", lambda f: None)  # attach starts uniform


def prepare_merge_uniform_full(ws, kind, arg) -> Prepared:
    return _fused(ws, kind, "deltas", lambda f: None)


register(Method("base", "baseline", "the base model, no expert", prepare_base))
register(Method("oracle", "baseline", "each input routed to its task's expert", prepare_oracle))
register(Method("shared", "baseline", "the expert trained on all tasks", prepare_shared))
register(Method("single", "baseline", "one named expert", prepare_single, needs_arg=True))
register(
    Method(
        "merge-uniform",
        "merging",
        "uniform merge of the factors: A = mean A_i, B = mean s_i B_i",
        prepare_merge_uniform,
    )
)
register(
    Method(
        "merge-uniform-full",
        "merging",
        "uniform merge of the full-rank deltas: mean s_i B_i A_i",
        prepare_merge_uniform_full,
    )
)
