"""Training data of the coefficient fits: encoded examples and the one training objective.

Every SGD fit (merging, routing, ensemble-sgd, ensemble-distill) turns the per-example
sums of its token losses into a batch loss through `Objective`, one of:
- "task": the task-balanced mean over the batch's examples of each example's mean token
  loss, example i of a task with c_t of the M training examples (T tasks) weighing
  M / (T c_t): in expectation over batches, the evaluation's metric (mean over tasks of
  the per-example mean NLL). lorafuse's default.
- "token": the mean over all target tokens of the batch, every token weighing the same
  (the paper's 1/|D| sum over (x_<t, x_t*) in D, Sections 3.2.1, 4.3, 4.4).
A fit's validation loss (lr choice, early stopping) is the evaluation's metric whichever
objective it trains with. Under gradient accumulation the loop weighs micro-batches by
their number of examples, so "token" is the exact token mean of a step only when one
micro-batch makes the step (grad_accum 1, one process).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from lorafuse.errors import LorafuseError

ObjectiveName = Literal["task", "token"]
OBJECTIVES: tuple[str, ...] = get_args(ObjectiveName)


def task_balanced_weights(tasks: list[str]) -> torch.Tensor:
    """Weights (M,) of M examples given each one's task: example i of a task with c_t
    examples (of T tasks) weighs M / (T c_t), so the weights have mean 1 and a weighted mean
    of per-example losses is the evaluation's mean over tasks."""
    counts = {t: tasks.count(t) for t in set(tasks)}
    M, T = len(tasks), len(counts)
    return torch.tensor([M / (T * counts[t]) for t in tasks])  # (M,)


class Objective:
    """The batch loss of a fit from per-example sums of token losses (module docstring).

    `tasks` are the M training examples' tasks (for the "task" weights); `name` is "task"
    or "token". Raises LorafuseError for another name.
    """

    def __init__(self, tasks: list[str], name: str = "task"):
        if name not in OBJECTIVES:
            raise LorafuseError(f"unknown objective {name!r}; choose one of {OBJECTIVES}")
        self.name = name
        self.weights = task_balanced_weights(tasks)  # (M,), mean 1

    def __call__(self, idx: Sequence[int], sums: Tensor, counts: Tensor) -> Tensor:
        """The loss of the examples `idx` (B,) given their summed token losses `sums` (B,)
        and target-token counts `counts` (B,)."""
        if self.name == "token":
            return sums.sum() / counts.sum().clamp(min=1)
        w = self.weights[list(idx)].to(sums.device, sums.dtype)  # (B,)
        return (w * sums / counts.clamp(min=1)).mean()


class TrainingSet:
    """Encoded examples of a workspace split and their `objective` (an `Objective`)."""

    def __init__(
        self, ws, split: str = "train", max_per_task: int | None = None, objective: str = "task"
    ):
        from lorafuse.data.collate import encode

        rows = ws.examples(split, max_per_task)
        self.ws = ws
        self.encoded = encode(ws.tokenizer, [(s, t) for s, t, _ in rows])
        self.tasks = [t for _, _, t in rows]
        self.objective = Objective(self.tasks, objective)
        self.weights = self.objective.weights  # (M,), mean 1: the "task" weights

    def __len__(self) -> int:
        return len(self.encoded)

    def batch(self, idx) -> dict[str, torch.Tensor]:
        """Collated tensors of the examples `idx`, on the workspace's device."""
        from lorafuse.data.collate import collate

        t = collate([self.encoded[i] for i in idx], self.ws.pad_id, self.ws.spec.max_length)
        return {k: v.to(self.ws.device) for k, v in t.items()}
