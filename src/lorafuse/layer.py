"""FusedLoRALinear: a base linear layer plus N stacked LoRA experts mixed by coefficients.

Two mixing spaces, each two GEMMs whose inner size is N*R over the concatenated factors:
- `factors` (the paper, mttl): y = W x + (sum_i l_i s_i B_i)(sum_i l_i A_i) x
- `deltas`  (full rank, PEFT):  y = W x + sum_i l_i s_i B_i A_i x
No Python loop over experts, no per-token (D, R) matrices and no (tokens, N, O) tensor.
With one-hot coefficients both reduce exactly to the single expert s_i B_i A_i x.

This module is the reference: `forward` and `delta` are the formula above. The speed-ups
(a joint GEMM with the base weight and a router's rows, hand-written backward passes,
oneDNN products, compiled CPU kernels) live in lorafuse.fast, behind `self.fast`: one
object chosen once per layer by `lorafuse.fast.choose` (the rule is written there), or
None. tests/fast prove the two agree.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorafuse import fast as fastpath
from lorafuse.base_layers import base_shape, compute_dtype, layer_shape
from lorafuse.errors import LorafuseError
from lorafuse.factors import SPACES, StackedModule, check_space
from lorafuse.mixers.protocol import Mixer

__all__ = ["SPACES", "FusedLoRALinear", "Mixer", "base_shape", "check_space"]


class FusedLoRALinear(nn.Module):
    """`base(x)` plus N LoRA experts mixed by the coefficients `mixer(x)` returns.

    The mixer (lorafuse.mixers.protocol.Mixer: a Module or any callable; None: the base
    layer alone) returns (N,), (B, N) or (B, T, N) coefficients for input x of shape
    (B, T, D) (or (T, D) with (N,) / (T, N) coefficients). Gradients flow to the mixer's
    parameters; the experts' factors are buffers (frozen). The base layer is an
    nn.Linear, a Conv1D or a bitsandbytes 4-bit / 8-bit layer (lorafuse.base_layers): the
    base output always comes from it, and the experts compute in its weight's dtype, or
    beside a quantized layer in its compute dtype (`dtype`, the model's activations, when
    it names none), x cast to it and back. `fast=False` builds the layer without its fast
    path (the reference alone). Raises LorafuseError for a layer of another kind, when
    the experts' shape is not the base layer's, or the space is unknown.
    """

    def __init__(
        self,
        base: nn.Module,
        stacked: StackedModule,
        space: str,
        name: str = "",
        fast=True,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        N, R, D, O = stacked.shape
        shape = layer_shape(base, name)
        if shape != (D, O):
            raise LorafuseError(
                f"module {name}: the model's layer is (in={shape[0]}, out={shape[1]}) but the "
                f"experts expect (in={D}, out={O}); the experts were trained on a different "
                "base model"
            )
        self.base = base
        self.name = name
        self.space = check_space(space)
        self.num_experts, self.rank, self.out_features = N, R, O
        like = {"device": base.weight.device, "dtype": compute_dtype(base, dtype)}
        # Rank-major order, row r*N + i = expert i's r-th factor: the products with the
        # coefficients (M, R, N) then run along N, not along the short R (vectorised).
        A = stacked.A.to(**like).transpose(0, 1).reshape(R * N, D)
        B = stacked.scaled_B().to(**like).permute(2, 0, 1).reshape(R * N, O)
        self.register_buffer("A_rows", A, persistent=False)  # (R*N, D)
        self.register_buffer("B_cat", B, persistent=False)  # (R*N, O), scalings folded in
        self.mixer: Mixer | None = None
        self.fast = fastpath.choose(self) if fast else None

    @property
    def A_cat(self) -> Tensor:
        """The experts' A factors side by side (D, R*N), rank-major (column r*N + i)."""
        return self.A_rows.T

    def __setattr__(self, name: str, value) -> None:
        if name == "mixer":  # any callable: a Module (registered) or a plain function
            self._modules.pop("mixer", None)
            self.__dict__.pop("mixer", None)
            if not isinstance(value, nn.Module):
                object.__setattr__(self, name, value)
                return
        super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        mixer = self.mixer
        if mixer is None:
            return self.base(x)  # (..., O)
        if self.fast is not None:
            y = self.fast(self, x, mixer)  # (..., O), or None where it declines the call
            if y is not None:
                return y
        return self.base(x) + self.delta(x, mixer(x))  # (..., O)

    def delta(self, x: Tensor, coefficients: Tensor) -> Tensor:
        """The mixed experts' contribution for input x (..., D) -> (..., O).

        `coefficients` (N,), (B, N) or (B, T, N); raises LorafuseError when they do not fit.
        """
        N, R = self.num_experts, self.rank
        dtype = x.dtype  # beside a quantized base the experts' compute dtype may differ
        x = x.to(self.A_rows.dtype)
        l = self.token_coefficients(coefficients, x).unsqueeze(-2)  # (1, N) or (M, 1, N)
        u = x.reshape(-1, x.shape[-1]) @ self.A_cat  # (M, R*N): A_i x, rank-major
        u = u.unflatten(-1, (R, N))  # (M, R, N)
        if self.space == "factors":
            u = (u * l).sum(-1, keepdim=True)  # (M, R, 1): (sum_j l_j A_j) x
        z = (u * l).flatten(-2)  # (M, R*N): l_i A_i x, or l_i (sum_j l_j A_j) x
        y = (z @ self.B_cat).view(*x.shape[:-1], self.out_features)  # sum_i s_i B_i z_i
        return y if dtype == x.dtype else y.to(dtype)  # (..., O), autocast's dtype kept

    def token_coefficients(self, c: Tensor, x: Tensor) -> Tensor:
        """Coefficients c as (N,) or one row per token (M, N), M = x.numel() / D.

        Raises LorafuseError when c does not end in N or its shape does not fit x.
        """
        N = self.num_experts
        if c.shape[-1] != N:
            raise LorafuseError(
                f"module {self.name}: coefficients of shape {tuple(c.shape)} do not end in "
                f"N={N} experts"
            )
        c = c.to(dtype=x.dtype, device=x.device)
        if c.dim() == 1:
            return c  # (N,)
        if c.dim() == x.dim():
            return c.expand(*x.shape[:-1], N).reshape(-1, N)  # (M, N)
        if c.dim() == 2 and x.dim() == 3:  # one vector per sequence
            return c[:, None, :].expand(*x.shape[:-1], N).reshape(-1, N)  # (M, N)
        raise LorafuseError(
            f"module {self.name}: coefficients of shape {tuple(c.shape)} do not fit input "
            f"{tuple(x.shape)}; use (N,), (B, N) or (B, T, N)"
        )

    def release(self) -> nn.Module:
        """The base layer, its parameters with storage of their own (not views of the fast
        path's buffer); this layer then runs its reference forward."""
        self.fast = None
        for p in self.base.parameters(recurse=False):
            if p.untyped_storage().nbytes() != p.nbytes:
                p.data = p.data.clone()
        return self.base

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, rank={self.rank}, space={self.space}"
