"""Optimal ensemble coefficients from cached expert probabilities, solved to a certificate.

An ensemble predicts p(x) = sum_i l_i p_i(x). With P (M, N) the probability each of N experts
gives the correct next token on M target tokens and token weights w (M,) summing to 1, the
ensemble loss f(l) = -sum_m w_m log(P_m . l) is convex on the simplex. We minimise it with EM
(multiplicative) updates l_i <- l_i r_i, r = P^T (w / P l) = -grad f, which never increase f,
and take a projected Newton step on the support instead whenever that lowers f further, so
the objective is monotone. The stopping rule is a certificate: the Frank-Wolfe gap
g.l - min_i g_i = max_i r_i - l.r bounds f(l) - f* from above (convexity).

Probabilities below `PROB_FLOOR` (1e-12) are raised to it, so a token no expert can predict
costs at most -log(1e-12) = 27.6 nats instead of infinity. Work is in float64: P takes
8 * M * N bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from lorafuse.errors import LorafuseError
from lorafuse.values import check_values

PROB_FLOOR = 1e-12
_ACTIVE = 1e-10  # coefficients above this are free in the Newton step
NEWTON_SIZE = 256  # coordinates a Newton step moves at first (bench/scaling.py: cost in N)


@dataclass
class EnsembleFit:
    """Result of `fit_ensemble`: coefficients, loss, certificate and the path taken."""

    weights: Tensor  # (N,) float64 on the simplex
    objective: float  # f(weights)
    gap: float  # Frank-Wolfe gap at weights: objective - optimum <= gap
    iterations: int
    converged: bool  # gap <= tol
    history: list[float] = field(default_factory=list)  # f at each iterate, initial first
    gaps: list[float] = field(default_factory=list)  # certificate at each iterate


def ensemble_objective(P, l, weights=None, floor: float = PROB_FLOOR) -> float:
    """f(l) = -sum_m w_m log(P_m . l) for P (M, N) and coefficients l (N,).

    Uses the same floor and weight normalisation as `fit_ensemble`; raises LorafuseError for
    bad P or weights.
    """
    P, w = _prepare(P, weights, floor)
    l = torch.as_tensor(l, dtype=torch.float64).reshape(-1)
    N = P.shape[1]
    check_values(l, "l", [(N,)], f"{N} coefficients (one per column of P)", "pass one per expert")
    return _f(P @ l, w)


def fit_ensemble(
    P,
    weights=None,
    *,
    init=None,
    tol: float = 1e-10,
    max_iter: int = 1000,
    newton: bool = True,
    floor: float = PROB_FLOOR,
) -> EnsembleFit:
    """Ensemble coefficients l (N,) minimising -sum_m w_m log(P_m . l) over the simplex.

    P (M, N): each expert's probability of the correct token (tensor or array, in [0, 1]);
    weights (M,): nonnegative token weights, normalised here to sum 1 (default uniform; see
    `lorafuse.evaluate.token_weights` for the paper's per-example, per-task averaging);
    init (N,): start point (default uniform). Stops when the Frank-Wolfe gap is <= tol,
    after max_iter iterations, or when no step lowers the objective in floating point.
    Raises LorafuseError for P that is not 2-D, holds NaN/Inf or values outside [0, 1],
    or bad weights/init.
    """
    P, w = _prepare(P, weights, floor)
    return _solve(P, w, _init(init, P.shape[1]), tol, max_iter, newton)


@dataclass
class SparseEnsemble:
    """Result of `sparse_greedy`: experts in the order chosen and the loss-versus-k curve."""

    order: list[int]  # (K,) expert indices, first chosen first
    objectives: list[float]  # (K,) optimal loss of the first k experts, k = 1..K
    weights: list[Tensor]  # K tensors (N,), coefficients of the first k experts (0 elsewhere)
    gaps: list[float]  # (K,) certificate of each subset fit


def sparse_greedy(
    P, weights=None, k_max: int | None = None, *, tol: float = 1e-10
) -> SparseEnsemble:
    """Best ensemble of at most k experts for k = 1..k_max, by greedy forward selection.

    Each step adds the expert whose inclusion, with coefficients re-optimised on the chosen
    subset by `fit_ensemble`, lowers the loss most. A candidate is skipped when the
    convexity bound f(l_S) - (Frank-Wolfe gap of S + {j} at l_S) shows it cannot beat the
    best found by more than tol, so the choice is that of plain greedy up to tol.
    P (M, N), weights (M,) as in `fit_ensemble`; k_max defaults to N. Raises LorafuseError
    for bad inputs or k_max outside 1..N.
    """
    P, w = _prepare(P, weights, floor=PROB_FLOOR)
    N = P.shape[1]
    k_max = N if k_max is None else k_max
    if not 1 <= k_max <= N:
        raise LorafuseError(f"k_max={k_max} must lie in 1..{N} (the number of experts)")
    single = -(w[:, None] * P.log()).sum(0)  # (N,) loss of each expert alone
    first = int(torch.argmin(single))
    l_s = torch.ones(1, dtype=torch.float64)  # (k,) coefficients on the chosen experts
    order, objectives, gaps = [first], [float(single[first])], [0.0]
    out_weights = [_embed(l_s, order, N)]
    for k in range(2, k_max + 1):
        r = P.T @ (w / (P[:, order] @ l_s))  # (N,) minus the gradient at the current fit
        # Frank-Wolfe gap on S + {j} at l_S bounds how far adding j can lower the loss
        gap_j = (torch.maximum(r, r[order].max()) - l_s @ r[order]).clamp_min(0)  # (N,)
        bound = (objectives[-1] - gap_j).tolist()  # (N,) lower bound on each candidate
        for i in order:
            bound[i] = float("inf")
        best = None
        for j in np.argsort(bound, kind="stable").tolist():
            if best is not None and bound[j] >= best[1].objective - tol:
                break  # sorted: no later candidate can win by more than tol
            start = torch.cat([l_s * (1 - 1 / k), l_s.new_tensor([1 / k])])  # (k,)
            fit = _solve(P[:, order + [j]], w, start, tol, 1000, True)
            if best is None or fit.objective < best[1].objective:
                best = (j, fit)
        j, fit = best
        order.append(j)
        l_s = fit.weights
        objectives.append(fit.objective)
        gaps.append(fit.gap)
        out_weights.append(_embed(l_s, order, N))
    return SparseEnsemble(order, objectives, out_weights, gaps)


# ---- internals --------------------------------------------------------------------------
def _solve(P: Tensor, w: Tensor, l: Tensor, tol: float, max_iter: int, newton: bool) -> EnsembleFit:
    q = P @ l  # (M,) ensemble probability of each token
    f = _f(q, w)
    history, gaps = [], []
    it = 0
    size = NEWTON_SIZE  # the most coordinates a Newton step moves (doubled when it fails)
    while True:
        r = P.T @ (w / q)  # (N,) = -grad f
        gap = max(float(r.max() - l @ r), 0.0)  # Frank-Wolfe gap: g.l - min_i g_i
        history.append(f)
        gaps.append(gap)
        if gap <= tol or it >= max_iter:
            break
        l_new = l * r
        l_new = l_new / l_new.sum()  # EM step: stays on the simplex, never increases f
        q_new = P @ l_new
        f_new = _f(q_new, w)
        if newton:
            step, capped = _newton(P, w, l, q, r, f, size)
            if step is not None and step[2] <= f_new:
                l_new, q_new, f_new = step
            if capped:
                size *= 2  # a face may miss the optimum's support: widen it step by step
        if f_new > f:
            break  # no floating-point progress left
        if f_new == f and _gap(P, w, l_new, q_new) >= gap:
            break  # a tie in f is taken only when it tightens the certificate
        l, q, f = l_new, q_new, f_new
        it += 1
    return EnsembleFit(l, f, gap, it, gap <= tol, history, gaps)


def _newton(P: Tensor, w: Tensor, l: Tensor, q: Tensor, r: Tensor, f: float, size: int):
    free = (l > _ACTIVE) | (r > 1)  # (N,) in the support, or wanting to enter it
    capped = int(free.sum()) > size
    if capped:  # a step costs M S^2 + S^3: step on the face of `size`
        # coordinates, from l with the others zeroed: the support by its next EM weights
        # l_i r_i, then those wanting to enter by r_i
        support = l > _ACTIVE  # (N,)
        merit = torch.where(support, l * r + r.max() + 1, r)  # (N,)
        keep = torch.where(free, merit, -1.0).topk(size).indices  # (S,)
        free = torch.zeros_like(free).index_fill_(0, keep, True)
        l = torch.where(free, l, 0.0)
        l = l / l.sum()
        q = P[:, free] @ l[free]  # (M,)
        r = torch.zeros_like(r).masked_scatter_(free, P[:, free].T @ (w / q))  # (N,) on free
    S = int(free.sum())
    Ps = P[:, free]  # (M, S)
    H = Ps.T @ (Ps * (w / q**2)[:, None])  # (S, S) Hessian of f on the free coordinates
    H = H + (1e-12 * H.diagonal().mean() + 1e-300) * torch.eye(S, dtype=H.dtype)
    kkt = torch.zeros(S + 1, S + 1, dtype=H.dtype)  # minimise -r.d + d.H.d / 2, sum d = 0
    kkt[:S, :S] = H
    kkt[:S, S] = 1.0
    kkt[S, :S] = 1.0
    rhs = torch.cat([r[free], r.new_zeros(1)])  # (S + 1,)
    try:
        d = torch.linalg.solve(kkt, rhs)[:S]  # (S,)
    except RuntimeError:
        return None, capped
    if not torch.isfinite(d).all():
        return None, capped
    alpha = 1.0
    for _ in range(30):  # backtrack along the projection arc
        l_try = l.clone()
        l_try[free] = (l[free] + alpha * d).clamp_min(0.0)
        l_try = l_try / l_try.sum()
        q_try = P @ l_try
        f_try = _f(q_try, w)
        if f_try <= f:
            return (l_try, q_try, f_try), capped
        alpha *= 0.5
    return None, capped


def _gap(P: Tensor, w: Tensor, l: Tensor, q: Tensor) -> float:
    r = P.T @ (w / q)  # (N,)
    return max(float(r.max() - l @ r), 0.0)


def _f(q: Tensor, w: Tensor) -> float:
    return float(-(w * q.log()).sum())


def _embed(l_s: Tensor, order: list[int], N: int) -> Tensor:
    out = torch.zeros(N, dtype=torch.float64)
    out[order] = l_s
    return out


def _prepare(P, weights, floor: float) -> tuple[Tensor, Tensor]:
    P = torch.as_tensor(P).detach().to("cpu", torch.float64)
    check_values(
        P,
        "P",
        [(None, None)],
        "a non-empty (M tokens, N experts) matrix of probabilities",
        "pass each expert's probability of the correct token, finite and in [0, 1]",
        axes=("token", "expert"),
    )
    lo, hi = float(P.min()), float(P.max())
    if lo < 0 or hi > 1 + 1e-6:
        raise LorafuseError(
            f"P must hold probabilities in [0, 1] but ranges over [{lo:.4g}, {hi:.4g}]; "
            "pass exp(-nll) or softmax outputs, not losses or log-probabilities"
        )
    M = P.shape[0]
    if weights is None:
        return P.clamp_min(floor), torch.full((M,), 1.0 / M, dtype=torch.float64)
    w = _nonnegative(weights, "weights", M, f"{M} numbers (P has {M} rows, one per token)")
    keep = w > 0  # tokens of zero weight cannot change the objective
    return P[keep].clamp_min(floor), w[keep] / w.sum()


def _init(init, N: int) -> Tensor:
    if init is None:
        return torch.full((N,), 1.0 / N, dtype=torch.float64)
    l = _nonnegative(init, "init", N, f"{N} coefficients (one per expert)")
    return l / l.sum()


def _nonnegative(v, what: str, n: int, expected: str) -> Tensor:
    # (n,) float64 on the CPU: finite, nonnegative and not all zero, else LorafuseError.
    v = torch.as_tensor(v).detach().to("cpu", torch.float64).reshape(-1)
    fix = f"pass {n} finite nonnegative numbers, not all zero (or None: uniform)"
    check_values(v, what, [(n,)], expected, fix)
    if (v < 0).any() or float(v.sum()) <= 0:
        shown = v.tolist() if n <= 8 else f"min {float(v.min()):.4g}, sum {float(v.sum()):.4g}"
        raise LorafuseError(f"{what} must be nonnegative and not all zero; got {shown}; {fix}")
    return v
