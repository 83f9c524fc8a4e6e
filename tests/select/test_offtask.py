"""The off-task ratio against the formula written out, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest

from lorafuse.errors import LorafuseError
from lorafuse.select.offtask import off_task_ratio


def test_ratio_is_the_mean_over_experts_of_off_task_loss_over_base():
    rng = np.random.default_rng(0)
    L = rng.uniform(0.2, 3.0, (3, 4))  # (N, T)
    base = rng.uniform(0.5, 1.5, 4)  # (T,)
    own = [{0}, {1, 2}, {0, 1, 2, 3}]  # the last expert has no off-task column
    r = off_task_ratio(L, base, own)
    e0 = (L[0, 1] / base[1] + L[0, 2] / base[2] + L[0, 3] / base[3]) / 3
    e1 = (L[1, 0] / base[0] + L[1, 3] / base[3]) / 2
    assert r["per_expert"][0] == pytest.approx(e0)
    assert r["per_expert"][1] == pytest.approx(e1)
    assert r["per_expert"][2] is None
    assert r["ratio"] == pytest.approx((e0 + e1) / 2)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 3)]
    assert r["off_task_loss"] == pytest.approx(np.mean([L[i, t] for i, t in pairs]))
    assert r["base_loss"] == pytest.approx(np.mean([base[t] for _, t in pairs]))
    own_means = [L[0, 0], (L[1, 1] + L[1, 2]) / 2, L[2].mean()]
    assert r["own_loss"] == pytest.approx(np.mean(own_means))


def test_experts_equal_to_the_base_have_ratio_one():
    base = np.array([0.7, 1.2, 2.0])
    L = np.tile(base, (3, 1))
    L[np.arange(3), np.arange(3)] = 0.1  # good on their own task only
    assert off_task_ratio(L, base, [{0}, {1}, {2}])["ratio"] == pytest.approx(1.0)


def test_refusals_name_the_problem():
    L = np.ones((2, 3))
    with pytest.raises(LorafuseError, match="must match"):
        off_task_ratio(L, [1.0, 1.0], [{0}, {1}])
    with pytest.raises(LorafuseError, match="> 0"):
        off_task_ratio(L, [1.0, 0.0, 1.0], [{0}, {1}])
    assert off_task_ratio(L, [1.0] * 3, [{0, 1, 2}, {0, 1, 2}])["ratio"] is None
