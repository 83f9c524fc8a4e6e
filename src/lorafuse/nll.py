"""Per-task test loss of a plain model on {task: [(source, target)]}, for the build's check.

The paper's convention (as `lorafuse.evaluate`, whose NLL it uses): per example the mean
NLL over its target tokens; per task the mean over examples; overall the mean over tasks
with the standard error across tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lorafuse.data.collate import Encoded, collate, encode
from lorafuse.evaluate import standard_error, target_nll


def example_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean NLL over each row's labelled tokens: logits (B, T, V), labels (B, T) -> (B,)."""
    nll_sum, n_tokens = target_nll(logits, labels)  # (B,), (B,)
    return nll_sum / n_tokens.clamp(min=1)  # (B,)


@torch.inference_mode()
def encoded_nll(
    model, encoded: Sequence[Encoded], pad_id: int, batch_size: int = 64, max_length: int = 256
) -> Tensor:
    """Per-example NLL (N,) of already encoded examples under `model` (batched).

    Examples are sorted by length first so that batches carry little padding.
    """
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    out = torch.empty(len(encoded))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([encoded[i] for i in idx], pad_id, max_length)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out[idx] = example_nll(logits, batch["labels"]).cpu()
    return out


def task_losses(
    model,
    tokenizer,
    data: dict[str, list[tuple[str, str]]],
    batch_size: int = 64,
    max_length: int = 256,
    before_task: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """{task: mean per-example NLL} for `data` = {task: [(source, target), ...]}.

    `before_task(task)` runs before each task (e.g. to switch the active expert).
    """
    out = {}
    for task, pairs in data.items():
        if before_task is not None:
            before_task(task)
        nll = encoded_nll(
            model, encode(tokenizer, pairs), tokenizer.pad_token_id, batch_size, max_length
        )
        out[task] = nll.mean().item()
    return out


def summarize(losses: dict[str, float]) -> tuple[float, float]:
    """(mean over tasks, standard error across tasks) of per-task losses."""
    values = list(losses.values())
    return sum(values) / len(values), standard_error(values)
