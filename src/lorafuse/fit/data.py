"""Training data of the coefficient fits: encoded examples with task-balanced weights."""

from __future__ import annotations

import torch


class TrainingSet:
    """Encoded examples of a workspace split with task-balanced weights (the evaluation's
    mean over tasks): example i of a task with c_t examples weighs M / (T c_t), mean 1."""

    def __init__(self, ws, split: str = "train", max_per_task: int | None = None):
        from lorafuse.data.collate import encode

        rows = ws.examples(split, max_per_task)
        self.ws = ws
        self.encoded = encode(ws.tokenizer, [(s, t) for s, t, _ in rows])
        tasks = [t for _, _, t in rows]
        counts = {t: tasks.count(t) for t in set(tasks)}
        M, T = len(rows), len(counts)
        self.weights = torch.tensor([M / (T * counts[t]) for t in tasks])  # (M,), mean 1

    def __len__(self) -> int:
        return len(self.encoded)

    def batch(self, idx) -> dict[str, torch.Tensor]:
        """Collated tensors of the examples `idx`, on the workspace's device."""
        from lorafuse.data.collate import collate

        t = collate([self.encoded[i] for i in idx], self.ws.pad_id, self.ws.spec.max_length)
        return {k: v.to(self.ws.device) for k, v in t.items()}
