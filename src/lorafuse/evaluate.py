"""Per-task negative log-likelihood, the paper's evaluation protocol.

Per example: the mean NLL over its target tokens. Per task: the mean over its examples.
Overall: the mean over tasks, with the standard error across tasks (and, for reference,
the token-weighted mean over all target tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from lorafuse.errors import LorafuseError
from lorafuse.formats.schema import Count, FileModel, check
from lorafuse.parallel import map_sharded

IGNORE = -100


def target_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed NLL of each row's target tokens and their count: (B, T, V), (B, T) -> (B,), (B,).

    Labels are aligned with the inputs (as transformers expects): the logit at t predicts
    the label at t + 1; positions labelled -100 are ignored. Computed in fp32.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE, reduction="none"
    )  # (B, T-1)
    mask = shift_labels != IGNORE  # (B, T-1)
    return (nll * mask).sum(1), mask.sum(1)


def target_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probability of every next target token and its mask: each (B, T-1).

    logits (B, T, V) and labels (B, T) aligned with the inputs; masked positions hold 0.
    """
    shift_labels = labels[:, 1:]  # (B, T-1)
    mask = shift_labels != IGNORE  # (B, T-1)
    logp = torch.log_softmax(logits[:, :-1].float(), -1)  # (B, T-1, V)
    picked = logp.gather(-1, shift_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return picked * mask, mask


@dataclass
class Result:
    """One method's evaluation: mean over tasks, standard error across tasks, per task."""

    method: str
    split: str
    mean: float
    se: float
    n_tasks: int
    token_mean: float
    per_task: dict[str, dict[str, float]]
    settings: dict[str, Any] = field(default_factory=dict)
    # Generated answers (lorafuse.answers): exact match and Rouge-L, mean +- se over tasks.
    answers: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the result file's schema)."""
        out = {
            "method": self.method,
            "split": self.split,
            "mean": self.mean,
            "se": self.se,
            "n_tasks": self.n_tasks,
            "token_mean": self.token_mean,
            "settings": self.settings,
            "per_task": self.per_task,
        }
        if self.answers is not None:
            out["answers"] = self.answers
        return out

    @classmethod
    def from_dict(cls, d: Any, source: str | Path = "result") -> Result:
        """Inverse of `to_dict`; raises FileFormatError naming `source` (the file `d` was
        read from) and the missing or mistyped field."""
        f = check(d, ResultFile, source, what="result file")
        return cls(
            method=f.method,
            split=f.split,
            mean=float(f.mean),
            se=float(f.se),
            n_tasks=len(f.per_task) if f.n_tasks is None else f.n_tasks,
            token_mean=float(f.token_mean),
            per_task=d["per_task"],
            settings=f.settings,
            answers=None if f.answers is None else d["answers"],
        )


class Score(FileModel):
    """A metric's mean and standard error over tasks."""

    mean: float
    se: float


class AnswersFile(FileModel):
    """The generated answers' scores in a result file."""

    exact_match: Score
    rouge_l: Score
    per_task: dict[str, dict[str, float]]


class ResultFile(FileModel):
    """A result file as `Result.from_dict` reads it. Losses may be NaN (lorafuse writes
    what a diverged method gave) but are numbers."""

    method: str
    split: str
    mean: float
    se: float
    n_tasks: Count | None = None
    token_mean: float = math.nan
    per_task: dict[str, dict[str, float]]
    settings: dict[str, Any] = Field(default_factory=dict)
    answers: AnswersFile | None = None


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean (sample std with ddof=1 over sqrt(n)); 0 for n < 2."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def per_task_means(per_example: Sequence[float], tasks: Sequence[str]) -> dict[str, list[float]]:
    """Group per-example losses by task, tasks in sorted order."""
    groups: dict[str, list[float]] = {}
    for task, loss in zip(tasks, per_example):
        groups.setdefault(task, []).append(loss)
    return dict(sorted(groups.items()))


def summarize(
    nll_sum: Tensor,
    n_tokens: Tensor,
    tasks: Sequence[str],
    method: str,
    split: str,
    settings: dict[str, Any] | None = None,
) -> Result:
    """Aggregate per-example NLL sums (M,) and target-token counts (M,) by task.

    Raises LorafuseError for no examples or an example without target tokens.
    """
    if len(tasks) != nll_sum.numel():
        raise LorafuseError(f"{len(tasks)} task names for {nll_sum.numel()} examples")
    if len(tasks) == 0:
        raise LorafuseError(f"no examples to evaluate for method {method} on split {split}")
    if (n_tokens <= 0).any():
        raise LorafuseError("an example has no target token; every target must be non-empty")
    per_example = (nll_sum.double() / n_tokens.double()).tolist()  # (M,)
    groups = per_task_means(per_example, tasks)
    per_task = {t: {"loss": sum(v) / len(v), "n_examples": len(v)} for t, v in groups.items()}
    losses = [v["loss"] for v in per_task.values()]
    return Result(
        method=method,
        split=split,
        mean=sum(losses) / len(losses),
        se=standard_error(losses),
        n_tasks=len(losses),
        token_mean=float(nll_sum.double().sum() / n_tokens.double().sum()),
        per_task=per_task,
        settings=dict(settings or {}),
    )


def batch_nll(
    forward: Callable[[Any], Tensor],
    batches: Iterable[Any],
    progress: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Run `forward(batch) -> logits (B, T, V)` over batches; NLL sums and counts (M,).

    Each batch has `.tensors["labels"]` (B, T). `progress(n)` is called with the number
    of rows done after each batch. Under `accelerate launch` each process runs its share
    of the batches and every process gets all M values, in the batches' order.
    """

    @torch.inference_mode()
    def one(batch) -> tuple[Tensor, Tensor]:
        logits = forward(batch)
        s, c = target_nll(logits, batch.tensors["labels"].to(logits.device))  # (B,), (B,)
        if progress is not None:
            progress(len(s))
        return s.cpu(), c.cpu()

    done = map_sharded(one, list(batches))
    if not done:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat([s for s, _ in done]), torch.cat([c for _, c in done])


def token_weights(task_ids, example_ids=None) -> Tensor:
    """Weights (M,) for the paper's loss: mean over tokens, then examples, then tasks.

    `task_ids` and `example_ids` are (M,) integer ids of each target token's task and
    example (example ids need only be unique within a task); without `example_ids` every
    token of a task counts equally. The result is positive and sums to 1. Raises
    LorafuseError for ids that are not 1-D integer sequences of the same length.
    """
    task = _token_ids(task_ids, "task_ids")  # (M,)
    example = (
        torch.zeros_like(task) if example_ids is None else _token_ids(example_ids, "example_ids")
    )
    if example.shape != task.shape:
        raise LorafuseError(
            f"example_ids has {example.numel()} entries but task_ids {task.numel()}; "
            "give one id per target token in both"
        )
    _, task_of = torch.unique(task, return_inverse=True)  # (M,) in 0..T-1
    pairs = torch.stack([task, example], 1)  # (M, 2)
    _, ex_of, tok_per_ex = torch.unique(pairs, dim=0, return_inverse=True, return_counts=True)
    ex_task = torch.empty(len(tok_per_ex), dtype=torch.long).scatter_(0, ex_of, task_of)
    ex_per_task = torch.bincount(ex_task)  # (T,)
    T = len(ex_per_task)
    return 1.0 / (tok_per_ex[ex_of] * ex_per_task[task_of] * T).double()  # (M,)


def _token_ids(x, name: str) -> Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1 or t.is_floating_point() or t.is_complex():
        raise LorafuseError(f"{name} must be a 1-D sequence of integer ids; got {tuple(t.shape)}")
    return t.long()
