"""Training data of the coefficient fits: encoded examples with task-balanced weights."""

from __future__ import annotations

import torch


def task_balanced_weights(tasks: list[str]) -> torch.Tensor:
    """Weights (M,) of M examples given each one's task: example i of a task with c_t
    examples (of T tasks) weighs M / (T c_t), so the weights have mean 1 and a weighted mean
    of per-example losses is the evaluation's mean over tasks."""
    counts = {t: tasks.count(t) for t in set(tasks)}
    M, T = len(tasks), len(counts)
    return torch.tensor([M / (T * counts[t]) for t in tasks])  # (M,)


class TrainingSet:
    """Encoded examples of a workspace split with task-balanced weights (the evaluation's
    mean over tasks): example i of a task with c_t examples weighs M / (T c_t), mean 1."""

    def __init__(self, ws, split: str = "train", max_per_task: int | None = None):
        from lorafuse.data.collate import encode

        rows = ws.examples(split, max_per_task)
        self.ws = ws
        self.encoded = encode(ws.tokenizer, [(s, t) for s, t, _ in rows])
        self.tasks = [t for _, _, t in rows]
        self.weights = task_balanced_weights(self.tasks)  # (M,), mean 1

    def __len__(self) -> int:
        return len(self.encoded)

    def batch(self, idx) -> dict[str, torch.Tensor]:
        """Collated tensors of the examples `idx`, on the workspace's device."""
        from lorafuse.data.collate import collate

        t = collate([self.encoded[i] for i in idx], self.ws.pad_id, self.ws.spec.max_length)
        return {k: v.to(self.ws.device) for k, v in t.items()}
