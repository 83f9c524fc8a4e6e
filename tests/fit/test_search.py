"""CMA-ES search under a budget: against functions whose minimum is known by hand."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from lorafuse.errors import LorafuseError
from lorafuse.fit.search import BUDGET, PLATEAU, SearchSettings, cma_search

pytest.importorskip("cma")


def counted(f):
    calls = []

    def g(x):
        calls.append(np.array(x))
        return f(x)

    return g, calls


def test_finds_a_quadratic_minimum_within_the_budget():
    target = np.array([0.4, -0.2, 0.7])

    def square(x):
        return float(((x - target) ** 2).sum())

    f, calls = counted(square)
    s = SearchSettings(max_passes=400, popsize=8, sigma=0.3, patience=None)
    r = cma_search(f, [0.0, 0.0, 0.0], s)
    assert len(calls) == r.passes == 1 + 8 * r.generations <= 400
    assert r.stop == BUDGET and not r.converged
    assert np.allclose(r.x, target, atol=0.02)
    assert r.value == pytest.approx(min(square(x) for x in calls))  # the best point seen
    assert calls[0].tolist() == [0.0, 0.0, 0.0]  # the start is evaluated first
    assert r.start_value == pytest.approx(float((target**2).sum()))


def test_stays_inside_the_bounds():
    # the minimum lies outside the box: the best point sits on its edge
    f, calls = counted(lambda x: float(((x - 3.0) ** 2).sum()))
    r = cma_search(f, [0.0, 0.0], SearchSettings(max_passes=200, popsize=6, bound=1.5, sigma=0.5))
    assert all(np.abs(x).max() <= 1.5 for x in calls)
    assert np.allclose(r.x, [1.5, 1.5], atol=0.05)


def test_never_worse_than_the_start_and_reproducible_per_seed():
    rng = np.random.default_rng(0)
    M = rng.normal(size=(4, 4))

    def f(x):
        return float(np.sin(M @ x).sum())

    s = SearchSettings(max_passes=41, popsize=8, seed=3)
    a, b = cma_search(f, np.zeros(4), s), cma_search(f, np.zeros(4), s)
    assert a.x == b.x and a.history == b.history
    assert a.value <= a.start_value == f(np.zeros(4))
    other = cma_search(f, np.zeros(4), SearchSettings(max_passes=41, popsize=8, seed=4))
    assert other.x != a.x


def test_plateau_stop_and_numpy_state_restored():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    # improvements far below min_delta (relative 1e-3) but above cma's own tolerances
    r = cma_search(lambda x: 1.0 + 1e-6 * float((x**2).sum()), [0.1, 0.1],
                   SearchSettings(max_passes=100, popsize=4))  # fmt: skip
    assert r.stop == PLATEAU and r.converged and r.generations == 3  # patience 3
    assert (np.random.get_state()[1] == before).all()


def test_bad_budget_and_start_are_named():
    with pytest.raises(LorafuseError, match="max_passes 5 .* at least 9"):
        cma_search(lambda x: 0.0, [0.0], SearchSettings(max_passes=5, popsize=8))
    with pytest.raises(LorafuseError, match=r"start \[2.0\] lies outside \[-1.5, 1.5\]"):
        cma_search(lambda x: 0.0, [2.0], SearchSettings())


def test_missing_cma_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cma", None)  # import cma raises ImportError
    with pytest.raises(LorafuseError, match=r"pip install 'lorafuse\[search\]'"):
        cma_search(lambda x: 0.0, [0.0], SearchSettings())
