"""Top-k sparsification of coefficients and the softmax the routers use (no loops)."""

from __future__ import annotations

import torch
from torch import Tensor

from lorafuse.errors import LorafuseError

LOG2E = 1.4426950408889634  # exp(z) = exp2(z * log2(e))
GRAIN = 32768  # ATen's grain size: elementwise ops on fewer elements stay on one thread


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise LorafuseError(f"top-k needs 1 <= k <= N={n}; got k={k}")


def softmax(z: Tensor) -> Tensor:
    """Softmax over the last dimension (..., N) -> (..., N), the values of torch.softmax.

    Routing runs per layer per token, so the small (B, 1, N) tensors of decoding matter.
    With several CPU threads, torch's softmax kernel opens a parallel region for any size
    and torch.exp goes through MKL's vector maths, which does the same; each such region
    waits for a second core, measured at ~5 ms per call on a busy machine against ~5 us
    for the elementwise ops below (exp2 is ATen's own single-threaded kernel at this
    size). Training (one op and one backward op instead of a dozen), large tensors (whose
    elementwise ops go parallel anyway), one thread and other devices use torch's kernel.
    """
    if not z.is_cpu or z.requires_grad or z.numel() >= GRAIN or torch.get_num_threads() == 1:
        return torch.softmax(z, -1)
    e = torch.exp2((z - z.amax(-1, keepdim=True)) * LOG2E)  # (..., N)
    return e / e.sum(-1, keepdim=True)


def topk_softmax(scores: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """Softmax of the k largest scores / temperature, zero elsewhere: (..., N) -> (..., N).

    This is Arrow's rule (paper B.1): keep the top-k experts' scores, softmax over them.
    """
    _check_k(k, scores.shape[-1])
    if k == scores.shape[-1]:
        return softmax(scores / temperature)
    top, idx = scores.topk(k, dim=-1)  # (..., K)
    weights = softmax(top / temperature)  # (..., K)
    return torch.zeros_like(scores).scatter(-1, idx, weights)  # (..., N)


def topk_renormalize(coefficients: Tensor, k: int) -> Tensor:
    """Keep the k largest coefficients and rescale them to sum to one (paper B.4)."""
    _check_k(k, coefficients.shape[-1])
    top, idx = coefficients.topk(k, dim=-1)  # (..., K)
    kept = torch.zeros_like(coefficients).scatter(-1, idx, top)  # (..., N)
    return kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)
