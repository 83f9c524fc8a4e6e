"""Input-independent coefficient providers: uniform, fixed, and learnable weights.

A mixer is any callable `mixer(x) -> coefficients` with `x` the fused layer's input
(B, T, D) and coefficients of shape (N,), (B, N) or (B, T, N). Modules here ignore `x`
(except for its dtype and device). One instance may be shared by all layers (global
weights) or each layer may get its own (per-layer weights).

Optionally, a mixer whose coefficients start with one linear map of x exposes it: a
`projection` tensor (P, D), P <= N, and `from_projection(p)` mapping p = x @ projection^T
(..., P) to the coefficients, with `mixer(x) == mixer.from_projection(x @ projection.T)`.
The fused layer then computes p inside its own GEMM, so x is read once (the routers in
lorafuse.mixers.routers do this); gradients still reach `projection`. If moreover its
coefficients are exactly softmax(q + b) with q = |p| (`absolute` true) or q = p, it
exposes the bias as `softmax_bias` (N,) (None otherwise), and the layer trains the whole
thing as one autograd Function (lorafuse.fast.functions.Routed).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorafuse.values import check_values

SHAPES = [(None,), (None, None), (None, None, None)]  # (N,), (B, N), (B, T, N)


class Fixed(nn.Module):
    """Fixed coefficients: (N,) global, (B, N) per sequence or (B, T, N) per token."""

    def __init__(self, coefficients: Tensor | list[float]):
        super().__init__()
        c = torch.as_tensor(coefficients, dtype=torch.float32)
        check_values(
            c,
            "coefficients",
            SHAPES,
            "of shape (N,), (B, N) or (B, T, N)",
            "give one finite coefficient per expert: global, per sequence or per token",
        )
        self.num_experts = c.shape[-1]
        self.register_buffer("coefficients", c, persistent=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.coefficients.to(device=x.device, dtype=x.dtype)


class Uniform(Fixed):
    """Every expert weighted 1/N."""

    def __init__(self, num_experts: int):
        super().__init__(torch.full((num_experts,), 1.0 / num_experts))


class Learned(nn.Module):
    """Learnable input-independent coefficients (N,).

    With `simplex=True` the coefficients are softmax(logits) (on the simplex, as in the
    paper); otherwise the raw weights are used. Share one instance across layers for
    global merging, one per layer for layer-wise merging.
    """

    def __init__(self, num_experts: int, init: Tensor | None = None, simplex: bool = True):
        super().__init__()
        self.num_experts = num_experts
        self.simplex = simplex
        if init is None:
            init = (
                torch.zeros(num_experts) if simplex else torch.full((num_experts,), 1 / num_experts)
            )
        elif simplex:
            init = torch.log(torch.as_tensor(init, dtype=torch.float32).clamp_min(1e-12))
        self.logits = nn.Parameter(torch.as_tensor(init, dtype=torch.float32).clone())

    def weights(self) -> Tensor:
        """The coefficients (N,) in fp32."""
        return torch.softmax(self.logits, -1) if self.simplex else self.logits

    def forward(self, x: Tensor) -> Tensor:
        return self.weights().to(device=x.device, dtype=x.dtype)
