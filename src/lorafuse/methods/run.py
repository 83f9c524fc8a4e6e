"""Evaluate one named method on one split of a workspace."""

from __future__ import annotations

import time
from collections.abc import Callable

from lorafuse.evaluate import Result, batch_nll, summarize
from lorafuse.methods.registry import resolve


def evaluate_method(
    ws,
    name: str,
    split: str = "test",
    kind: str = "private",
    max_per_task: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Result:
    """Per-task NLL of method `name` (e.g. `oracle`, `single:<expert>`) on `split`.

    `kind` picks the expert library (private, mbc, ...). Raises LorafuseError for an
    unknown method, kind, split or task map problem.
    """
    method, arg = resolve(name)
    batches = ws.batches(split, max_per_task)
    tasks = [t for b in batches for t in b.tasks]
    start = time.perf_counter()
    prepared = method.prepare(ws, kind, arg)
    try:
        sums, counts = batch_nll(prepared.forward, batches, progress)
    finally:
        prepared.close()
    settings = {
        "experts": kind,
        "max_examples_per_task": max_per_task,
        "device": str(ws.device),
        "dtype": str(ws.dtype).replace("torch.", ""),
        "passes": prepared.passes,
        "seconds": round(time.perf_counter() - start, 3),
        **prepared.info,
    }
    return summarize(sums, counts, tasks, name, split, settings)


def total_rows(ws, split: str, max_per_task: int | None) -> int:
    """Number of examples `evaluate_method` will run (for progress bars)."""
    return len(ws.examples(split, max_per_task))
