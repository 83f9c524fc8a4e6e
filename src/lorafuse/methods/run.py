"""Evaluate or fit one method of the table by name, on a workspace."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lorafuse.errors import LorafuseError
from lorafuse.evaluate import Result, batch_nll, summarize
from lorafuse.methods.method import Context, Fitted, Method
from lorafuse.methods.registry import resolve
from lorafuse.parallel import agreed, once


def method_context(
    ws,
    name: str,
    kind: str = "private",
    options: dict[str, Any] | None = None,
    progress: Callable[..., None] | None = None,
    cache_dir: str | None = None,
) -> tuple[Method, Context]:
    """(method, context) of `name` over the `kind` experts (a method with fixed experts,
    `shared`, uses its own) with `options` validated against the method's options model.

    Raises LorafuseError for an unknown method or an unknown or invalid option.
    """
    method, arg = resolve(name)
    ctx = Context(
        ws,
        name,  # as called: a fit is saved under its argument too (`ensemble-sparse:4`)
        method.experts or kind,
        arg,
        method.parse_options(options),
        progress,
        cache_dir,
    )
    return method, ctx


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
    method, ctx = method_context(ws, name, kind)
    batches = ws.batches(split, max_per_task)
    tasks = [t for b in batches for t in b.tasks]
    start = time.perf_counter()
    with method.prepare(ctx) as prepared:
        sums, counts = batch_nll(prepared.forward, batches, progress)
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


ROWS_PER_STEP = 256  # prompt rows x experts run per decoding forward


def decoding(ws, prepared, tasks: list[str], batch_size: int | None):
    """(decoder factory, prompts per batch) of a prepared method: an ensemble of n
    experts runs n rows per prompt, so its batches hold fewer prompts."""
    from lorafuse.generate import ModelDecoder

    decoder = prepared.decoder or (lambda tasks: ModelDecoder(ws.model))
    size = batch_size or ws.spec.batch_size
    return decoder, max(1, min(size, ROWS_PER_STEP // max(1, prepared.passes)))


def generate_answers(
    ws,
    name: str,
    split: str = "test",
    kind: str = "private",
    max_per_task: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Greedy answers of method `name` to every example of `split` (at most
    `max_per_task` per task), scored by exact match and Rouge-L (lorafuse.answers).

    Returns score_answers' dict plus "settings" (caps, tokens generated, seconds) and
    "samples" (each task's first example: prompt end, reference, answer). Raises
    LorafuseError as evaluate_method does.
    """
    from lorafuse.answers import MAX_NEW_TOKENS, answer_prompts, decode_answers, score_answers
    from lorafuse.generate import generate_ids

    method, ctx = method_context(ws, name, kind)
    cap = max_new_tokens or MAX_NEW_TOKENS
    prompts = answer_prompts(ws, split, max_per_task, cap)
    tok = ws.tokenizer
    start = time.perf_counter()
    with method.prepare(ctx) as prepared:
        decoder, size = decoding(ws, prepared, prompts.tasks, batch_size)
        rows = generate_ids(
            decoder, prompts.ids, prompts.caps, tok.eos_token_id, ws.pad_id, prompts.tasks,
            size, ws.device, progress,
        )  # fmt: skip
        passes = prepared.passes
    answers = decode_answers(tok, rows)
    out = score_answers(answers, prompts.references, prompts.tasks)
    out["settings"] = {
        "experts": kind,
        "split": split,
        "max_examples_per_task": max_per_task,
        "max_new_tokens": cap,
        "examples": len(answers),
        "generated_tokens": sum(len(r) for r in rows),
        "passes": passes,
        "seconds": round(time.perf_counter() - start, 3),
    }
    seen: dict[str, dict[str, str]] = {}
    for ids, ref, task, answer in zip(prompts.ids, prompts.references, prompts.tasks, answers):
        if task not in seen:
            prompt = tok.decode(ids, skip_special_tokens=True)
            seen[task] = {"prompt": prompt[-120:], "reference": ref, "answer": answer}
    out["samples"] = dict(sorted(seen.items()))
    return out


def generate_text(
    ws,
    name: str,
    prompts: list[str],
    kind: str = "private",
    task: str | None = None,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy continuations of `prompts` by method `name` over the `kind` experts.

    `ws` is a Workspace, or a benchmark folder or library spec (a path) to open one.
    `task` is each prompt's task, which an oracle needs (its expert is the task's).
    Raises LorafuseError for an unknown method or kind, an oracle without a known task,
    an empty prompt or max_new_tokens < 1.
    """
    from lorafuse.answers import decode_answers
    from lorafuse.generate import generate_ids
    from lorafuse.workspace import Workspace

    if not isinstance(ws, Workspace):
        from lorafuse.spec import load_spec

        ws = Workspace(load_spec(ws))
    if max_new_tokens < 1:
        raise LorafuseError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    method, ctx = method_context(ws, name, kind)
    tok = ws.tokenizer
    ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
    tasks = [task or ""] * len(ids)
    with method.prepare(ctx) as prepared:
        decoder, size = decoding(ws, prepared, tasks, None)
        rows = generate_ids(
            decoder, ids, [max_new_tokens] * len(ids), tok.eos_token_id, ws.pad_id, tasks,
            size, ws.device,
        )  # fmt: skip
    return decode_answers(tok, rows)


def total_rows(ws, split: str, max_per_task: int | None) -> int:
    """Number of examples `evaluate_method` will run (for progress bars)."""
    return len(ws.examples(split, max_per_task))


def fit_method(
    ws,
    name: str,
    kind: str = "private",
    options: dict[str, Any] | None = None,
    progress: Callable[..., None] | None = None,
    cache_dir: str | None = None,
) -> Fitted:
    """Fit method `name` over the `kind` experts and save its fit file; return the fit.

    `options` are validated against the method's options model. `progress` is called as
    the fit advances; `cache_dir` holds the experts' cached passes (default
    `<fits>/.cache`). Under `accelerate launch` only the main process writes the fit (and
    the method's files), and every process returns once it is written. Raises
    LorafuseError for an unknown method, an unknown or bad option, or a method that has
    nothing to fit.
    """
    from lorafuse.formats.fits import save_fit

    method, _ = resolve(name)
    if method.fitted_by is not None:
        raise LorafuseError(
            f"method {method.name} evaluates the fit of {method.fitted_by}; fit "
            f"{method.fitted_by} instead (`lorafuse fit --method {method.fitted_by}`)"
        )
    if method.fit is None:
        raise LorafuseError(f"method {method.name} has nothing to fit; evaluate it directly")
    _, ctx = method_context(ws, name, kind, options, progress, cache_dir)
    start = time.perf_counter()
    fitted = agreed(lambda: method.fit(ctx))  # a process's error stops every process
    fitted.summary["fit_seconds"] = round(time.perf_counter() - start, 3)
    fitted.detail["options"] = ctx.options.model_dump(mode="json", exclude_unset=True)
    once(lambda: save_fit(ws, name, kind, fitted.payload))  # one writer, the others wait
    return fitted


def evaluate_cached(ws, name: str, cached, kind: str = "private", split: str = "test") -> Result:
    """Score probability-level ensemble `name` from cached target log-probabilities.

    `cached` is the TargetLogprobs of every `kind` expert on `split` (lorafuse.cache); the
    ensemble's probability of a target token is sum_i w_i p_i, exactly what its forward
    computes, so no model pass is needed. Raises LorafuseError for a method that is not a
    probability-level ensemble or a cache of other experts.
    """
    import math

    import torch

    method, ctx = method_context(ws, name, kind)
    if method.weights is None:
        raise LorafuseError(f"method {name} is not a probability-level ensemble")
    start = time.perf_counter()
    w = method.weights(ctx).double()  # (N,)
    if list(cached.experts) != ws.library(kind).names or w.numel() != len(cached.experts):
        raise LorafuseError(f"the cached log-probabilities are not those of the {kind} experts")
    logw = torch.where(w > 0, w.clamp_min(1e-300).log(), torch.full_like(w, -math.inf))
    logq = torch.logsumexp(cached.logp.double() + logw, dim=1)  # (target tokens,)
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


def base_task_losses(
    ws, tasks: list[str], split: str = "validation", max_per_task: int | None = None
) -> list[float]:
    """The base model's mean NLL on each of `tasks` (the evaluation's metric on `split`),
    in the order given. LorafuseError when a task has no example there."""
    r = evaluate_method(ws, "base", split, kind=ws.kinds[0], max_per_task=max_per_task)
    missing = [t for t in tasks if t not in r.per_task]
    if missing:
        raise LorafuseError(f"the {split} split has no example of task(s) {', '.join(missing)}")
    return [float(r.per_task[t]["loss"]) for t in tasks]
