"""Exact ensemble fits against scipy, brute force and hand-derived cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from lorafuse.errors import LorafuseError
from lorafuse.evaluate import token_weights
from lorafuse.fit.exact import (
    PROB_FLOOR,
    ensemble_objective,
    fit_ensemble,
    sparse_greedy,
)


def random_problem(seed: int, M: int = 200, N: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (M, N) with experts of different sharpness, and weights (M,)."""
    g = np.random.default_rng(seed)
    P = g.uniform(0, 1, (M, N)) ** g.uniform(0.5, 4, N)
    w = g.uniform(0, 1, M)
    return P, w / w.sum()


def scipy_optimum(P: np.ndarray, w: np.ndarray) -> float:
    """f* by SLSQP over the simplex, an independent solver."""
    N = P.shape[1]
    res = minimize(
        lambda l: -(w * np.log(P @ l)).sum(),
        np.full(N, 1.0 / N),
        jac=lambda l: -P.T @ (w / (P @ l)),
        method="SLSQP",
        bounds=[(0.0, 1.0)] * N,
        constraints=[{"type": "eq", "fun": lambda l: l.sum() - 1.0}],
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return float(res.fun)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy(seed):
    P, w = random_problem(seed)
    fit = fit_ensemble(torch.from_numpy(P), w)
    f_star = scipy_optimum(P, w)
    assert fit.converged and fit.gap <= 1e-10
    assert abs(fit.objective - f_star) < 1e-6
    assert fit.objective <= f_star + 1e-9
    l = fit.weights
    assert (l >= 0).all() and abs(float(l.sum()) - 1) < 1e-12
    assert fit.objective == pytest.approx(-(w * np.log(P @ l.numpy())).sum(), abs=1e-12)


@pytest.mark.parametrize("newton", [True, False])
def test_objective_never_increases(newton):
    P, w = random_problem(3, M=150, N=8)
    fit = fit_ensemble(P, w, newton=newton, max_iter=300)
    assert len(fit.history) == fit.iterations + 1 == len(fit.gaps)
    assert (np.diff(fit.history) <= 0).all()
    assert fit.history[-1] == fit.objective


def test_certificate_bounds_suboptimality():
    P, w = random_problem(4, M=150, N=6)
    f_star = scipy_optimum(P, w)
    for newton in (False, True):
        fit = fit_ensemble(P, w, newton=newton, max_iter=200)
        excess = np.asarray(fit.history) - f_star  # (iterations + 1,)
        assert (excess <= np.asarray(fit.gaps) + 1e-12).all()
        assert fit.gaps[0] > 1e-3  # the bound is not vacuous: it starts loose, then closes


def test_identical_experts_give_that_expert():
    P, w = random_problem(5, M=100, N=1)
    fit = fit_ensemble(np.repeat(P, 4, axis=1), w)
    assert fit.objective == pytest.approx(-(w * np.log(P[:, 0])).sum(), abs=1e-12)
    assert fit.gap <= 1e-10


def test_dominant_expert_takes_all_weight():
    P, w = random_problem(6, M=100, N=5)
    P[:, 2] = np.minimum(P.max(1) * 1.1 + 0.01, 1.0)  # expert 2 is best on every token
    fit = fit_ensemble(P, w)
    assert float(fit.weights[2]) > 1 - 1e-8
    assert fit.objective == pytest.approx(-(w * np.log(P[:, 2])).sum(), abs=1e-9)


def test_zero_probabilities_use_the_floor():
    P = np.array([[0.0, 0.5], [0.0, 0.0], [0.25, 0.5]])  # token 1: no expert predicts it
    fit = fit_ensemble(P)
    assert np.isfinite(fit.objective) and fit.converged
    ref = ensemble_objective(P, fit.weights)
    assert fit.objective == pytest.approx(ref)
    assert fit.objective >= -np.log(PROB_FLOOR) / 3  # the impossible token costs 27.6 / 3


def test_token_weights_follow_the_paper_convention():
    g = np.random.default_rng(7)
    task = g.integers(0, 3, 60)
    example = g.integers(0, 5, 60)  # ids repeat across tasks: only (task, example) is unique
    nll = g.uniform(0, 3, 60)
    w = token_weights(task, example).numpy()
    assert w.sum() == pytest.approx(1.0) and (w > 0).all()
    per_task = []
    for t in sorted(set(task)):
        per_ex = [nll[(task == t) & (example == e)].mean() for e in sorted(set(example[task == t]))]
        per_task.append(np.mean(per_ex))
    assert (w * nll).sum() == pytest.approx(np.mean(per_task), abs=1e-12)
    fit = fit_ensemble(np.exp(-nll)[:, None], w)  # one expert: loss is the paper's number
    assert fit.objective == pytest.approx(np.mean(per_task), abs=1e-12)


def test_sparse_greedy_full_k_is_the_optimum():
    P, w = random_problem(8, M=120, N=5)
    sg = sparse_greedy(P, w)
    assert sorted(sg.order) == list(range(5))
    assert sg.objectives[-1] == pytest.approx(fit_ensemble(P, w).objective, abs=1e-9)
    assert (np.diff(sg.objectives) <= 1e-12).all()
    for k, l in enumerate(sg.weights, start=1):
        assert int((l > 0).sum()) <= k and abs(float(l.sum()) - 1) < 1e-12


def test_sparse_greedy_against_brute_force():
    P, w = random_problem(9, M=120, N=5)
    sg = sparse_greedy(P, w)
    single = [-(w * np.log(P[:, i])).sum() for i in range(5)]
    assert sg.order[0] == int(np.argmin(single))
    assert sg.objectives[0] == pytest.approx(min(single), abs=1e-12)
    for k in range(1, 6):
        best = min(
            fit_ensemble(P[:, list(s)], w).objective for s in itertools.combinations(range(5), k)
        )
        assert sg.objectives[k - 1] >= best - 1e-9  # greedy is an upper bound on the best k
    order = [sg.order[0]]  # plain greedy, every candidate fitted: pruning changes nothing
    for k in range(2, 6):
        fits = {j: fit_ensemble(P[:, order + [j]], w).objective for j in range(5) if j not in order}
        order.append(min(fits, key=fits.get))
        assert sg.objectives[k - 1] == pytest.approx(fits[order[-1]], abs=1e-9)
    assert sg.order == order


def test_bad_inputs_raise():
    P, w = random_problem(10, M=10, N=3)
    with pytest.raises(LorafuseError, match="NaN"):
        fit_ensemble(np.where(P > 0.5, np.nan, P))
    with pytest.raises(LorafuseError, match="log-probabilities"):
        fit_ensemble(np.log(P))
    with pytest.raises(LorafuseError, match="10 rows"):
        fit_ensemble(P, w[:4])
    with pytest.raises(LorafuseError, match="shape"):
        fit_ensemble(P[:, 0])
    with pytest.raises(LorafuseError, match="k_max=4"):
        sparse_greedy(P, w, k_max=4)


@pytest.mark.parametrize("seed", [0, 1])
def test_newton_on_a_face_of_a_large_library(seed, monkeypatch):
    # More free coordinates than NEWTON_SIZE: the Newton step moves NEWTON_SIZE of them and
    # zeroes the rest; the fit still reaches scipy's optimum with a certificate computed
    # here by hand (convexity: f(l) - f* <= max_i r_i - l.r, r = P^T (w / P l)).
    import lorafuse.fit.exact as exact

    monkeypatch.setattr(exact, "NEWTON_SIZE", 4)
    P, w = random_problem(10 + seed, M=60, N=24)
    fit = fit_ensemble(P, w)
    l = fit.weights.numpy()
    r = P.T @ (w / (P @ l))  # (N,)
    assert fit.converged and r.max() - l @ r <= 1e-9
    assert abs(fit.objective - scipy_optimum(P, w)) < 1e-6
    assert (np.diff(fit.history) <= 0).all()
