"""Evaluate one named method on one split of a workspace."""

from __future__ import annotations

import time
from collections.abc import Callable

from lorafuse.errors import LorafuseError
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


def fit_method(ws, name: str, kind: str = "private", options: dict | None = None) -> dict:
    """Fit method `name` over the `kind` experts and save its coefficients; return the fit.

    Raises LorafuseError for an unknown method or one that has nothing to fit.
    """
    from lorafuse.formats.fits import save_fit

    method, arg = resolve(name)
    if method.fitted_by is not None:
        raise LorafuseError(
            f"method {method.name} evaluates the fit of {method.fitted_by}; fit "
            f"{method.fitted_by} instead (`lorafuse fit --method {method.fitted_by}`)"
        )
    if method.fit is None:
        raise LorafuseError(f"method {method.name} has nothing to fit; evaluate it directly")
    start = time.perf_counter()
    payload = method.fit(ws, kind, arg, dict(options or {}))
    payload["fit_seconds"] = round(time.perf_counter() - start, 3)
    payload["options"] = {
        k: v for k, v in (options or {}).items() if k not in ("progress",) and _jsonable(v)
    }
    save_fit(ws, name, kind, payload)
    return payload


def _jsonable(v) -> bool:
    return isinstance(v, (int, float, str, bool, list, tuple, type(None)))


def evaluate_cached(ws, name: str, cached, kind: str = "private", split: str = "test") -> Result:
    """Score probability-level ensemble `name` from cached target log-probabilities.

    `cached` is the TargetLogprobs of every `kind` expert on `split` (lorafuse.cache); the
    ensemble's probability of a target token is sum_i w_i p_i, exactly what its forward
    computes, so no model pass is needed. Raises LorafuseError for a method that is not a
    probability-level ensemble or a cache of other experts.
    """
    import math

    import torch

    method, arg = resolve(name)
    if method.weights is None:
        raise LorafuseError(f"method {name} is not a probability-level ensemble")
    start = time.perf_counter()
    w = method.weights(ws, kind, arg).double()  # (N,)
    if list(cached.experts) != ws.library(kind).names or w.numel() != len(cached.experts):
        raise LorafuseError(f"the cached log-probabilities are not those of the {kind} experts")
    logw = torch.where(w > 0, w.clamp_min(1e-300).log(), torch.full_like(w, -math.inf))
    logq = torch.logsumexp(cached.logp.double() + logw, dim=1)  # (K,)
    M = len(cached.tasks)
    sums = torch.zeros(M, dtype=torch.float64).index_add_(0, cached.example, -logq)  # (M,)
    counts = torch.bincount(cached.example, minlength=M)  # (M,)
    settings = {
        "experts": kind,
        "device": str(ws.device),
        "dtype": str(ws.dtype).replace("torch.", ""),
        "passes": int((w > 0).sum()),
        "level": "probs",
        "nonzero": int((w > 0).sum()),
        "from_cache": True,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return summarize(sums, counts, cached.tasks, name, split, settings)
