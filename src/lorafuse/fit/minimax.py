"""The paper's B.5 linear program: ensemble coefficients minimising the worst task's error.

Given the validation error matrix M (N experts x T tasks), solve
    min_{c, l} c   s.t.   sum_i l_i M_it <= c for every task t,   l >= 0,   sum_i l_i = 1
with HiGHS (`scipy.optimize.linprog`). The paper finds only ~30% of the coefficients nonzero
(Figure 6) and an average loss worse than uniform ensembling (lorafuse.study.figures
draws it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorafuse.errors import LorafuseError
from lorafuse.matrix import as_loss_matrix

NONZERO = 1e-9  # a coefficient counts as nonzero above this


@dataclass
class MinimaxFit:
    """Result of `fit_minimax`."""

    weights: np.ndarray  # (N,) on the simplex
    value: float  # c = max_t task_losses[t], the worst task's mixture error
    task_losses: np.ndarray  # (T,) sum_i l_i M_it
    frac_nonzero: float  # share of weights > NONZERO
    status: int  # linprog status (0: optimal)
    message: str  # linprog message


def fit_minimax(errors) -> MinimaxFit:
    """Minimax ensemble coefficients for an error matrix `errors` (N experts, T tasks).

    The LP's weights are clipped at 0 and renormalised, and `value` is recomputed as the
    largest task loss, so every constraint holds exactly for the returned numbers (HiGHS
    alone guarantees them to its 1e-7 feasibility tolerance). Raises LorafuseError when
    `errors` is not a non-empty 2-D matrix, holds NaN/Inf, or the LP fails.
    """
    from scipy.optimize import linprog

    M = _errors(errors)  # (N, T)
    N, T = M.shape
    cost = np.zeros(N + 1)
    cost[N] = 1.0  # variables x = (l_1..l_N, c); minimise c
    A_ub = np.hstack([M.T, -np.ones((T, 1))])  # (T, N + 1): M^T l - c <= 0
    A_eq = np.hstack([np.ones((1, N)), np.zeros((1, 1))])  # (1, N + 1): sum l = 1
    bounds = [(0.0, None)] * N + [(None, None)]
    res = linprog(
        cost, A_ub=A_ub, b_ub=np.zeros(T), A_eq=A_eq, b_eq=[1.0], bounds=bounds, method="highs"
    )
    if res.x is None:
        raise LorafuseError(
            f"the minimax LP failed (status {res.status}: {res.message}); check that the "
            "error matrix holds finite losses of reasonable magnitude"
        )
    l = np.clip(res.x[:N], 0.0, None)  # (N,)
    l = l / l.sum()
    task_losses = l @ M  # (T,)
    return MinimaxFit(
        weights=l,
        value=float(task_losses.max()),
        task_losses=task_losses,
        frac_nonzero=float((l > NONZERO).mean()),
        status=int(res.status),
        message=str(res.message),
    )


def _errors(errors) -> np.ndarray:
    return as_loss_matrix(errors, "error matrix")
