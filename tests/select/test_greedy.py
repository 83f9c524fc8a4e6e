"""Greedy task-level selection against brute force over subsets and a direct loop."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lorafuse.errors import LorafuseError
from lorafuse.select.greedy import (
    greedy_select,
    not_best_on_own_task,
    private_oracle_loss,
)
from lorafuse.study.figures import plot_greedy


def brute_force_curve(L: np.ndarray) -> np.ndarray:
    """min over all subsets of size k of mean_t min_{i in S} L_it, for k = 1..N."""
    N = L.shape[0]
    return np.array(
        [
            min(L[list(s)].min(0).mean() for s in itertools.combinations(range(N), k))
            for k in range(1, N + 1)
        ]
    )


def test_greedy_against_brute_force():
    L = np.random.default_rng(0).uniform(0, 1, (7, 9))  # (N, T)
    sel = greedy_select(L)
    best = brute_force_curve(L)
    assert sel.curve[0] == best[0]  # k = 1 is exact
    assert sel.order[0] == int(np.argmin(L.mean(1)))
    assert (sel.curve >= best - 1e-12).all()  # greedy is an upper bound for every k
    assert sel.curve[-1] == best[-1] == L.min(0).mean()
    assert sorted(sel.order) == list(range(7))
    assert (np.diff(sel.curve) <= 0).all()
    assert sel.k_reached == int(np.flatnonzero(sel.curve <= L.min(0).mean() + 1e-9)[0]) + 1


def test_greedy_is_optimal_with_disjoint_specialists():
    # Expert i is better than the baseline 2.0 only on its own tasks (disjoint), so a
    # subset's score adds up expert by expert and greedy is provably optimal. Values are
    # dyadic and T is a power of 2, so every mean is exact.
    T, N = 16, 6
    L = np.full((N, T), 2.0)
    owned = np.array_split(np.arange(T), N)
    gains = [0.5, 1.0, 0.25, 1.5, 0.75, 0.125]
    for i, (tasks, gain) in enumerate(zip(owned, gains)):
        L[i, tasks] -= gain
    sel = greedy_select(L)
    np.testing.assert_array_equal(sel.curve, brute_force_curve(L))


def test_target_and_k_max():
    L = np.random.default_rng(1).uniform(0, 1, (6, 5))
    own = [0, 1, 2, 3, 4]
    oracle = private_oracle_loss(L, own)
    assert oracle == pytest.approx(np.mean([L[o, t] for t, o in enumerate(own)]))
    sel = greedy_select(L, target=oracle)
    assert sel.target == oracle
    assert sel.curve[sel.k_reached - 1] <= oracle + 1e-9
    assert sel.k_reached == 1 or sel.curve[sel.k_reached - 2] > oracle + 1e-9
    short = greedy_select(L, k_max=1, target=-1.0)
    assert len(short.curve) == 1 and short.k_reached is None
    with pytest.raises(LorafuseError, match="k_max=7"):
        greedy_select(L, k_max=7)
    with pytest.raises(LorafuseError, match="no own expert"):
        private_oracle_loss(L, [0, 1, None, 3, 4])


def test_not_best_on_own_task_matches_a_loop():
    g = np.random.default_rng(2)
    L = g.uniform(0, 1, (10, 12))
    L[3, 3] = L[:, 3].min()  # a tie for best counts as best
    own = [t if t < 10 else None for t in range(12)]
    expected = []
    for t, i in enumerate(own):
        if i is not None and any(L[j, t] < L[i, t] for j in range(10)):
            expected.append(i)
    assert not_best_on_own_task(L, own) == sorted(set(expected))
    assert 3 not in not_best_on_own_task(L, own)
    with pytest.raises(LorafuseError, match="12 tasks"):
        not_best_on_own_task(L, own[:5])
    with pytest.raises(LorafuseError, match="outside 0..9"):
        not_best_on_own_task(L, [10] * 12)


def test_bad_matrix_raises():
    with pytest.raises(LorafuseError, match="expert 0, task 1"):
        greedy_select(np.array([[0.1, np.inf], [0.2, 0.3]]))
    with pytest.raises(LorafuseError, match="2-D"):
        greedy_select(np.ones(4))


def test_plot_is_written(tmp_path):
    L = np.random.default_rng(3).uniform(0, 1, (8, 6))
    sel = greedy_select(L)
    oracle = float(L.diagonal().mean())
    out = plot_greedy(sel.curve, sel.target, tmp_path / "fig7.png", sel.k_reached, oracle)
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp-*"))
