"""The B.5 minimax LP against a simplex grid, a hand-derived case and its own constraints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafuse.errors import LorafuseError
from lorafuse.fit.minimax import fit_minimax
from lorafuse.study.figures import plot_minimax


def test_constraints_hold():
    M = np.random.default_rng(0).uniform(0.5, 2.0, (12, 9))  # (N, T)
    fit = fit_minimax(M)
    assert fit.status == 0
    assert (fit.weights >= -1e-9).all() and abs(fit.weights.sum() - 1) < 1e-9
    assert (fit.weights @ M <= fit.value + 1e-9).all()
    np.testing.assert_allclose(fit.task_losses, fit.weights @ M, atol=1e-12)
    assert fit.frac_nonzero == pytest.approx((fit.weights > 1e-9).mean())


def test_value_matches_a_simplex_grid():
    M = np.random.default_rng(1).uniform(0.0, 1.0, (3, 4))  # (N, T)
    fit = fit_minimax(torch.from_numpy(M))
    n = 400
    a, b = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = a + b <= n
    grid = np.stack([a[keep], b[keep], n - a[keep] - b[keep]], 1) / n  # (G, 3) on the simplex
    grid_value = (grid @ M).max(1).min()
    # the LP is at least as good as any grid point, and the grid is within one step of it
    assert fit.value <= grid_value + 1e-12
    assert grid_value - fit.value <= 3 * np.abs(M).max() / n  # L1 rounding error <= 3 / n


def test_two_specialists_split_evenly():
    M = np.array([[0.2, 1.0], [1.0, 0.2]])  # each expert good on a different task
    fit = fit_minimax(M)
    np.testing.assert_allclose(fit.weights, [0.5, 0.5], atol=1e-9)
    assert fit.value == pytest.approx(0.6, abs=1e-9)
    assert fit.frac_nonzero == 1.0


def test_value_beats_every_pure_expert():
    M = np.random.default_rng(2).uniform(0.0, 3.0, (8, 20))
    fit = fit_minimax(M)
    assert fit.value <= M.max(1).min() + 1e-12


def test_bad_matrices_raise():
    with pytest.raises(LorafuseError, match="expert 1, task 0"):
        fit_minimax(np.array([[1.0, 2.0], [np.nan, 1.0]]))
    with pytest.raises(LorafuseError, match="2-D"):
        fit_minimax(np.ones(3))
    with pytest.raises(LorafuseError, match="2-D"):
        fit_minimax(np.ones((0, 3)))


def test_plot_is_written(tmp_path):
    fit = fit_minimax(np.random.default_rng(3).uniform(0, 1, (10, 6)))
    out = plot_minimax(fit.weights, tmp_path / "figs" / "fig6.png")
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".*.tmp-*"))
