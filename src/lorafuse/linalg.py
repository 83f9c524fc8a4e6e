"""Linear algebra on low-rank products B @ A without forming the (O, D) matrix."""

from __future__ import annotations

import torch
from torch import Tensor


def lowrank_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of the product B @ A from its factors: returns U (O, M), S (M,), Vh (M, D).

    B is (O, M), A is (M, D). Works through QR of both factors and an (M, M) SVD, so the
    cost is O((O + D) M^2) instead of an (O, D) decomposition. Computed in fp64 (at
    least fp32) for accuracy; results are returned in fp32.
    """
    dt = torch.float64
    Qb, Rb = torch.linalg.qr(B.to(dt))  # (O, M), (M, M)
    Qa, Ra = torch.linalg.qr(A.to(dt).T)  # (D, M), (M, M)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)  # (M, M), (M,), (M, M)
    return (Qb @ U).float(), S.float(), (Vh @ Qa.T).float()


def truncate_product(B: Tensor, A: Tensor, k: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-k factors of B @ A: returns (B' (O, k), A' (k, D), energy kept in [0, 1]).

    Energy is the fraction of the squared Frobenius norm (sum of squared singular
    values) that the top k singular values keep; 1.0 for a zero product.
    """
    U, S, Vh = lowrank_svd(B, A)
    k = min(k, S.numel())
    total = float((S.double() ** 2).sum())
    kept = float((S[:k].double() ** 2).sum())
    root = S[:k].sqrt()  # (k,)
    return U[:, :k] * root, root[:, None] * Vh[:k], (kept / total if total > 0 else 1.0)


def truncate_dense(M: Tensor, k: int | None = None) -> tuple[Tensor, Tensor, float | None]:
    """Factors of a dense M (O, D) by its SVD: returns (B (O, k), A (k, D), energy kept).

    `k` None keeps the numerical rank of M (singular values above S_max * max(O, D) *
    eps, torch.linalg.matrix_rank's rule), so B @ A equals M up to fp32 rounding, at
    most min(O, D) columns, and the energy is None (nothing dropped). A zero M gives a
    zero pair of rank 1. The SVD is fp32 and costs O(O D min(O, D)).
    """
    O, D = M.shape
    U, S, Vh = torch.linalg.svd(M.float(), full_matrices=False)  # (O, P), (P,), (P, D)
    if k is None:
        tol = float(S[0]) * max(O, D) * torch.finfo(S.dtype).eps if S.numel() else 0.0
        k, energy = int((tol < S).sum()), None
    else:
        k = min(k, S.numel())
        total = float((S.double() ** 2).sum())
        energy = float((S[:k].double() ** 2).sum()) / total if total > 0 else 1.0
    if k == 0:
        return torch.zeros(O, 1), torch.zeros(1, D), energy
    root = S[:k].sqrt()  # (k,)
    return U[:, :k] * root, root[:, None] * Vh[:k], energy
