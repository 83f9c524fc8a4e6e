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
