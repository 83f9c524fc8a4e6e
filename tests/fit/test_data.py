"""The fits' one training objective: task-balanced and token-level means, written out."""

from __future__ import annotations

import pytest
import torch

from lorafuse.errors import LorafuseError
from lorafuse.fit.data import Objective

# Four training examples of two tasks (three of task a, one of b) and each one's target
# token losses, of different lengths so the two means differ.
TASKS = ["a", "a", "b", "a"]
TOKEN_NLL = [[1.0, 2.0], [3.0], [4.0, 2.0, 6.0], [0.5, 0.5, 0.5, 0.5]]


def _sums_counts(idx):
    sums = torch.tensor([sum(TOKEN_NLL[i]) for i in idx])
    counts = torch.tensor([len(TOKEN_NLL[i]) for i in idx])
    return sums, counts


def test_token_objective_is_the_mean_over_the_batchs_target_tokens():
    idx = [0, 1, 2]
    tokens = [x for i in idx for x in TOKEN_NLL[i]]  # every token weighs the same
    expected = sum(tokens) / len(tokens)  # (1 + 2 + 3 + 4 + 2 + 6) / 6 = 3
    got = Objective(TASKS, "token")(idx, *_sums_counts(idx))
    assert got.item() == pytest.approx(expected)
    assert got.item() == pytest.approx(3.0)


def test_task_objective_is_the_task_balanced_mean_of_per_example_means():
    # The weight of an example of a task with c_t of the M examples (T tasks) is
    # M / (T c_t): here a's examples weigh 4 / (2 * 3), b's 4 / (2 * 1).
    weight = {"a": 4 / 6, "b": 4 / 2}
    idx = [0, 1, 2]
    per_example = [sum(TOKEN_NLL[i]) / len(TOKEN_NLL[i]) for i in idx]  # 1.5, 3, 4
    expected = sum(weight[TASKS[i]] * v for i, v in zip(idx, per_example)) / len(idx)
    got = Objective(TASKS, "task")(idx, *_sums_counts(idx))
    assert got.item() == pytest.approx(expected)  # 11 / 3
    assert got.item() != pytest.approx(Objective(TASKS, "token")(idx, *_sums_counts(idx)).item())


def test_task_objective_over_all_examples_is_the_evaluations_mean_over_tasks():
    idx = list(range(len(TASKS)))
    per_task: dict[str, list[float]] = {}
    for i in idx:
        per_task.setdefault(TASKS[i], []).append(sum(TOKEN_NLL[i]) / len(TOKEN_NLL[i]))
    expected = sum(sum(v) / len(v) for v in per_task.values()) / len(per_task)  # 17 / 6
    got = Objective(TASKS, "task")(idx, *_sums_counts(idx))
    assert got.item() == pytest.approx(expected)


def test_an_unknown_objective_is_an_error_naming_the_choices():
    with pytest.raises(LorafuseError, match="unknown objective 'tokens'.*task.*token"):
        Objective(TASKS, "tokens")
