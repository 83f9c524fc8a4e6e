"""Generated answers: the protocol's second measure, beside the per-task NLL.

Each example's source is the prompt (the end kept when it is too long, as collation
does); its answer is decoded greedily (lorafuse.generate) until the end-of-sequence
token or the task's length cap, and scored against the target by exact match and
Rouge-L (lorafuse.metrics). Per task: the mean over its examples. Overall: the mean over
tasks with the standard error across tasks, as for the NLL.

The length cap comes from the data: the longest target of the task in the split (all
of its examples, in tokens with the separating space and the end-of-sequence token)
plus a quarter (at least 2 tokens), and never more than `max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorafuse.errors import LorafuseError
from lorafuse.evaluate import per_task_means, standard_error
from lorafuse.metrics import METRICS

MAX_NEW_TOKENS = 64


@dataclass
class Prompts:
    """Prompts of one split: token ids, caps of new tokens, references and tasks (M,)."""

    ids: list[list[int]]
    caps: list[int]
    references: list[str]
    tasks: list[str]


def task_caps(tokenizer, rows: Sequence[tuple[str, str, str]], max_new_tokens: int) -> dict:
    """{task: cap of new tokens} from (source, target, task) rows: the longest target of
    the task (with its space and EOS) plus a quarter, at least 2 more, at most
    `max_new_tokens`."""
    from lorafuse.data.collate import encode

    longest: dict[str, int] = {}
    encoded = encode(tokenizer, [(s, t) for s, t, _ in rows])
    for (_, target), (_, _, task) in zip(encoded, rows):
        longest[task] = max(longest.get(task, 0), len(target))
    return {t: min(max_new_tokens, n + max(2, n // 4)) for t, n in longest.items()}


def answer_prompts(
    ws, split: str, max_per_task: int | None = None, max_new_tokens: int = MAX_NEW_TOKENS
) -> Prompts:
    """The prompts of `split` (at most `max_per_task` per task) with their caps (tasks'
    caps from every example of the split). Raises LorafuseError for max_new_tokens < 1
    or a split without examples."""
    from lorafuse.data.collate import encode

    if max_new_tokens < 1:
        raise LorafuseError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    caps = task_caps(ws.tokenizer, ws.examples(split), max_new_tokens)
    rows = ws.examples(split, max_per_task)
    encoded = encode(ws.tokenizer, [(s, t) for s, t, _ in rows])
    ids = []
    for (source, _), (_, _, task) in zip(encoded, rows):
        keep = max(1, ws.spec.max_length - caps[task])
        ids.append(source[-keep:])
    return Prompts(
        ids, [caps[t] for _, _, t in rows], [t for _, t, _ in rows], [t for _, _, t in rows]
    )


def score_answers(
    answers: Sequence[str], references: Sequence[str], tasks: Sequence[str]
) -> dict[str, Any]:
    """Exact match and Rouge-L of each answer, per task and mean +- se over tasks.

    Returns {"exact_match": {"mean", "se"}, "rouge_l": {"mean", "se"}, "n_tasks",
    "per_task": {task: {"exact_match", "rouge_l", "n_examples"}}}, tasks sorted. Raises
    LorafuseError for lists of different lengths or no answer.
    """
    if not len(answers) == len(references) == len(tasks):
        raise LorafuseError(
            f"{len(answers)} answers, {len(references)} references and {len(tasks)} tasks"
        )
    if not answers:
        raise LorafuseError("no answers to score")
    per_task: dict[str, dict[str, float]] = {}
    out: dict[str, Any] = {}
    for name, metric in METRICS.items():
        scores = [metric(a, r) for a, r in zip(answers, references)]  # (M,)
        groups = per_task_means(scores, tasks)
        for task, values in groups.items():
            per_task.setdefault(task, {"n_examples": len(values)})[name] = sum(values) / len(values)
        means = [per_task[t][name] for t in groups]
        out[name] = {"mean": sum(means) / len(means), "se": standard_error(means)}
    out["n_tasks"] = len(per_task)
    out["per_task"] = per_task
    return out


def decode_answers(tokenizer, rows: Sequence[Sequence[int]]) -> list[str]:
    """Generated token ids -> text (special tokens dropped, surrounding spaces trimmed)."""
    return [tokenizer.decode(list(r), skip_special_tokens=True).strip() for r in rows]
