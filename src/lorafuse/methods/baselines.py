"""Baselines and static merges: base, oracle, shared, single:<expert>, merge-uniform(-full)."""

from __future__ import annotations

from contextlib import ExitStack
from functools import partial

import torch

from lorafuse.errors import LorafuseError
from lorafuse.generate import ModelDecoder
from lorafuse.methods.method import Context, Cost, Method, Prepared
from lorafuse.model import attached


def _logits(ws, batch):
    return ws.logits(batch.tensors)


def _fused(ctx: Context, space: str, setup) -> Prepared:
    ws = ctx.ws
    with ExitStack() as stack:  # detached here if setup fails, else by the Prepared
        setup(stack.enter_context(attached(ws.model, ctx.library, space)))
        info = {"experts": ctx.kind}
        return Prepared(lambda b: _logits(ws, b), stack.pop_all().close, info=info)


def prepare_base(ctx: Context) -> Prepared:
    return Prepared(partial(_logits, ctx.ws))


def prepare_oracle(ctx: Context) -> Prepared:
    ws, library = ctx.ws, ctx.library
    mapping = ws.task_map(ctx.kind, ws.tasks)
    index = {t: library.index([e])[0] for t, e in mapping.items()}
    eye = torch.eye(len(library))
    with ExitStack() as stack:
        fusion = stack.enter_context(attached(ws.model, library, "factors"))

        def route(tasks: list[str]) -> None:
            unknown = sorted({t for t in tasks if t not in index})
            if unknown:
                known = ", ".join(sorted(index)[:8]) + (" ..." if len(index) > 8 else "")
                raise LorafuseError(
                    f"the oracle routes each input to its task's expert and has no "
                    f"{ctx.kind} expert for task {unknown[0]!r}; give one of its tasks: {known}"
                )
            rows = torch.tensor([index[t] for t in tasks])
            fusion.set_coefficients(eye[rows])  # (B, N): each row its task's expert

        def forward(batch):
            route(batch.tasks)
            return _logits(ws, batch)

        def decoder(tasks: list[str]) -> ModelDecoder:
            route(tasks)  # the coefficients hold for every step of the batch
            return ModelDecoder(ws.model)

        info = {"experts": ctx.kind}
        return Prepared(forward, stack.pop_all().close, info=info, decoder=decoder)


def _first(fusion) -> None:
    fusion.set_expert(0)


def _uniform(fusion) -> None:
    """attach starts uniform: nothing to set."""


def prepare_shared(ctx: Context) -> Prepared:
    return _fused(ctx, "factors", _first)


def prepare_single(ctx: Context) -> Prepared:
    return _fused(ctx, "factors", lambda f: f.set_expert(ctx.arg))


def prepare_merge_uniform(ctx: Context) -> Prepared:
    return _fused(ctx, "factors", _uniform)


def prepare_merge_uniform_full(ctx: Context) -> Prepared:
    return _fused(ctx, "deltas", _uniform)


FOLDED = Cost(experts=0, folded=True)

METHODS = (
    Method("base", "baseline", "the base model, no expert", prepare_base, cost=Cost(experts=0)),
    Method(
        "oracle",
        "baseline",
        "each input routed to its task's expert",
        prepare_oracle,
        paper=("fig2", "fig4"),
    ),
    Method(
        "shared",
        "baseline",
        "the expert trained on all tasks",
        prepare_shared,
        experts="shared",
        paper=("fig2",),
    ),
    Method("single", "baseline", "one named expert", prepare_single, needs_arg=True),
    Method(
        "merge-uniform",
        "merging",
        "uniform merge of the factors: A = mean A_i, B = mean s_i B_i",
        prepare_merge_uniform,
        cost=FOLDED,
        paper=("fig2", "fig4", "B.2"),
    ),
    Method(
        "merge-uniform-full",
        "merging",
        "uniform merge of the full-rank deltas: mean s_i B_i A_i",
        prepare_merge_uniform_full,
        cost=FOLDED,
        paper=("B.2",),
    ),
)
