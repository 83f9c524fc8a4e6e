"""Top-k sparsification of coefficients (no loops)."""

from __future__ import annotations

import torch
from torch import Tensor

from lorafuse.errors import LorafuseError


def check_k(k: int | None, n: int) -> int | None:
    """k as an int if 1 <= k <= N=n, None for None (all experts); else LorafuseError."""
    if k is not None and not 1 <= int(k) <= n:
        raise LorafuseError(f"top-k needs 1 <= k <= N={n} (or None for all); got k={k}")
    return None if k is None else int(k)


def topk_softmax(scores: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """Softmax of the k largest scores / temperature, zero elsewhere: (..., N) -> (..., N).

    This is Arrow's rule (paper B.1): keep the top-k experts' scores, softmax over them.
    """
    check_k(k, scores.shape[-1])
    if k == scores.shape[-1]:
        return torch.softmax(scores / temperature, -1)
    top, idx = scores.topk(k, dim=-1)  # (..., K)
    weights = torch.softmax(top / temperature, -1)  # (..., K)
    return torch.zeros_like(scores).scatter(-1, idx, weights)  # (..., N)


def topk_renormalize(coefficients: Tensor, k: int) -> Tensor:
    """Keep the k largest coefficients and rescale them to sum to one (paper B.4)."""
    check_k(k, coefficients.shape[-1])
    top, idx = coefficients.topk(k, dim=-1)  # (..., K)
    kept = torch.zeros_like(coefficients).scatter(-1, idx, top)  # (..., N)
    return kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)
