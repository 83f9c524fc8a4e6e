"""Mode connectivity between two experts (paper Section 4.2, Figure 3).

For alpha in a grid over [0, 1] the interpolated expert ((1-alpha) A_1 + alpha A_2,
(1-alpha) B_1 + alpha B_2) (the factors space) is evaluated on the union of the two
experts' tasks, next to the per-input oracle: the better of the two experts on each input.
All alphas of a batch run as one forward (each row repeated per alpha, per-row
coefficients through the fused layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lorafuse.ensemble import chunks, coefficient_rows
from lorafuse.errors import LorafuseError
from lorafuse.evaluate import per_task_means, standard_error, target_nll
from lorafuse.model import attached


def _protocol(per_example: list[float], tasks: list[str]) -> tuple[float, float]:
    losses = [sum(v) / len(v) for v in per_task_means(per_example, tasks).values()]
    return sum(losses) / len(losses), standard_error(losses)


def connectivity(
    ws,
    kind: str,
    pair: Sequence[str],
    alphas: Sequence[float],
    split: str = "test",
    max_per_task: int | None = None,
    rows_per_pass: int = 256,
) -> dict[str, Any]:
    """Loss of the interpolation path between two experts and of the per-input oracle.

    Raises LorafuseError for a pair that is not two distinct known experts, or an expert
    with no recorded task.
    """
    lib = ws.library(kind)
    if len(pair) != 2 or pair[0] == pair[1]:
        raise LorafuseError(f"--pair needs two different experts (A,B); got {list(pair)}")
    sub = lib.subset(list(pair))
    tasks = sorted({t for e in sub.experts for t in e.tasks} & set(ws.tasks))
    if not tasks or any(not e.tasks for e in sub.experts):
        raise LorafuseError(
            f"experts {list(pair)} need recorded tasks in the data (lorafuse_expert.json) to "
            "define the union of their tasks"
        )
    alphas = [float(a) for a in alphas]
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise LorafuseError(f"alphas must lie in [0, 1]; got {alphas}")
    grid = sorted(set(alphas) | {0.0, 1.0})
    coeff = torch.tensor([[1 - a, a] for a in grid])  # (G, 2)
    batches = [b for b in ws.batches(split, max_per_task) if set(b.tasks) & set(tasks)]
    nll: list[torch.Tensor] = []  # per batch (G, B')
    row_tasks: list[str] = []
    with attached(ws.model, sub, "factors") as fusion:
        for b in batches:
            keep = [i for i, t in enumerate(b.tasks) if t in tasks]
            t = {k: v[keep].to(ws.device) for k, v in b.tensors.items()}
            B = len(keep)
            parts = []
            for chunk in chunks(list(range(len(grid))), B, rows_per_pass):
                g = coeff[chunk]  # (n, 2)
                fusion.set_coefficients(coefficient_rows(g, B))  # (n*B, 2)
                with torch.inference_mode():
                    logits = ws.model(
                        input_ids=t["input_ids"].repeat(len(g), 1),
                        attention_mask=t["attention_mask"].repeat(len(g), 1),
                    ).logits  # (n*B, T, V)
                    s, c = target_nll(logits, t["labels"].repeat(len(g), 1))
                parts.append((s / c).view(len(g), B).cpu())
            nll.append(torch.cat(parts))
            row_tasks += [b.tasks[i] for i in keep]
    per_alpha = torch.cat(nll, 1)  # (G, M)
    oracle = torch.minimum(per_alpha[0], per_alpha[-1]).tolist()  # endpoints: the experts
    curve = [_protocol(row.tolist(), row_tasks) for row in per_alpha]
    return {
        "pair": list(pair),
        "tasks": tasks,
        "split": split,
        "alphas": grid,
        "loss": [m for m, _ in curve],
        "se": [s for _, s in curve],
        "oracle": _protocol(oracle, row_tasks)[0],
        "n_examples": len(row_tasks),
    }
