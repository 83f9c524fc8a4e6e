"""FusedLoRALinear: a base linear layer plus N stacked LoRA experts mixed by coefficients.

Two mixing spaces, each two GEMMs whose inner size is N*R over the concatenated factors:
- `factors` (the paper, mttl): y = W x + (sum_i l_i s_i B_i)(sum_i l_i A_i) x
- `deltas`  (full rank, PEFT):  y = W x + sum_i l_i s_i B_i A_i x
No Python loop over experts, no per-token (D, R) matrices and no (tokens, N, O) tensor.
With one-hot coefficients both reduce exactly to the single expert s_i B_i A_i x.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lorafuse.errors import LorafuseError
from lorafuse.library import StackedModule

SPACES = ("factors", "deltas")
Mixer = Callable[[Tensor], Tensor]


def check_space(space: str) -> str:
    """Return `space` if it is a known mixing space, else raise LorafuseError."""
    if space not in SPACES:
        raise LorafuseError(f"unknown mixing space {space!r}; choose one of {', '.join(SPACES)}")
    return space


def base_shape(base: nn.Module) -> tuple[int, int]:
    """(D, O) of an nn.Linear or a transformers Conv1D (weight stored (D, O))."""
    w = base.weight
    if isinstance(base, nn.Linear):
        return w.shape[1], w.shape[0]
    if type(base).__name__ == "Conv1D":
        return w.shape[0], w.shape[1]
    raise LorafuseError(f"cannot fuse a {type(base).__name__}; only nn.Linear and Conv1D")


class FusedLoRALinear(nn.Module):
    """`base(x)` plus N LoRA experts mixed by the coefficients `mixer(x)` returns.

    The mixer returns (N,), (B, N) or (B, T, N) coefficients for input x of shape
    (B, T, D) (or (T, D) with (N,) / (T, N) coefficients). Gradients flow to the
    mixer's parameters; the experts' factors are buffers (frozen).
    """

    def __init__(self, base: nn.Module, stacked: StackedModule, space: str, name: str = ""):
        super().__init__()
        N, R, D, O = stacked.shape
        if base_shape(base) != (D, O):
            raise LorafuseError(
                f"module {name}: the model's layer is (in={base_shape(base)[0]}, "
                f"out={base_shape(base)[1]}) but the experts expect (in={D}, out={O}); "
                "the experts were trained on a different base model"
            )
        self.base = base
        self.name = name
        self.space = check_space(space)
        self.num_experts, self.rank = N, R
        w = base.weight
        A = stacked.A.to(device=w.device, dtype=w.dtype)
        B = stacked.B.to(device=w.device, dtype=w.dtype)
        self.register_buffer("A_cat", A.permute(2, 0, 1).reshape(D, N * R), persistent=False)
        self.register_buffer("B_cat", B.permute(0, 2, 1).reshape(N * R, O), persistent=False)
        self.register_buffer("scale", stacked.scale.to(device=w.device), persistent=False)
        self.mixer: Mixer | None = None

    def __setattr__(self, name: str, value) -> None:
        if name == "mixer":  # any callable: a Module (registered) or a plain function
            self._modules.pop("mixer", None)
            self.__dict__.pop("mixer", None)
            if not isinstance(value, nn.Module):
                object.__setattr__(self, name, value)
                return
        super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # (B, T, O)
        if self.mixer is None:
            return y
        coefficients = self.mixer(x)
        if self._row_sparse(coefficients, x):
            d = self._row_sparse_delta(x, coefficients.to(x.dtype))  # (B, T, O)
            return y + d if y.requires_grad or coefficients.requires_grad else y.add_(d)
        if y.requires_grad or coefficients.requires_grad or not y.is_contiguous():
            return y + self.delta(x, coefficients)
        # No autograd here: the second GEMM accumulates straight into the base output.
        z, B = self._mixed_factors(x, coefficients)
        y2 = y.view(-1, y.shape[-1])  # (B*T, O)
        y2.addmm_(z.reshape(y2.shape[0], -1).to(y.dtype), B.to(y.dtype))
        return y

    def delta(self, x: Tensor, coefficients: Tensor) -> Tensor:
        """The mixed experts' contribution for input x (..., D) -> (..., O)."""
        if self._row_sparse(coefficients, x):
            return self._row_sparse_delta(x, coefficients.to(x.dtype))
        z, B = self._mixed_factors(x, coefficients)
        return z @ B  # (..., O)

    def _mixed_factors(self, x: Tensor, coefficients: Tensor) -> tuple[Tensor, Tensor]:
        # (z, B) with delta = z @ B: z (..., N*R) or (..., R), B (N*R, O) or (R, O).
        N, R = self.num_experts, self.rank
        l = self._broadcast(coefficients, x)  # (N,) or (..., N)
        ls = l * self.scale.to(l.dtype)  # (..., N)
        if l.dim() == 1 and self.space == "factors":
            # Global coefficients: fold into one rank-R pair first (cheaper, same result).
            A = (self.A_cat.view(-1, N, R) * l[:, None]).sum(1)  # (D, R)
            B = (self.B_cat.view(N, R, -1) * ls[:, None, None]).sum(0)  # (R, O)
            return x @ A, B  # (..., R), (R, O)
        u = (x @ self.A_cat).unflatten(-1, (N, R))  # (..., N, R)
        if self.space == "factors":
            h = (u * l.unsqueeze(-1)).sum(-2)  # (..., R)  = (sum l_i A_i) x
            z = ls.unsqueeze(-1) * h.unsqueeze(-2)  # (..., N, R)
        else:
            z = u * ls.unsqueeze(-1)  # (..., N, R)
        return z.flatten(-2), self.B_cat  # (..., N*R), (N*R, O)

    def _row_sparse(self, c: Tensor, x: Tensor) -> bool:
        # Per-sequence coefficients using at most half of the experts in every row (one-hot
        # rows of the matrix, ensembles, the oracle): gather each row's experts instead.
        if c.dim() != 2 or x.dim() != 3 or c.shape != (x.shape[0], self.num_experts):
            return False
        return 2 * int((c != 0).sum(-1).max()) <= self.num_experts

    def _row_sparse_delta(self, x: Tensor, c: Tensor) -> Tensor:
        # Per-row (not per-token) mixed factors of the K experts each row uses.
        N, R = self.num_experts, self.rank
        K = max(1, int((c != 0).sum(-1).max()))
        idx = c.abs().topk(K, dim=-1).indices  # (B, K)
        w = c.gather(-1, idx)  # (B, K)
        ws = w * self.scale.to(c.dtype)[idx]  # (B, K)
        A = self.A_cat.view(-1, N, R)[:, idx]  # (D, B, K, R)
        B = self.B_cat.view(N, R, -1)[idx]  # (B, K, R, O)
        if self.space == "factors":
            A_mix = torch.einsum("dbkr,bk->bdr", A, w)  # (B, D, R)
            B_mix = torch.einsum("bkro,bk->bro", B, ws)  # (B, R, O)
            return torch.bmm(torch.bmm(x, A_mix), B_mix)  # (B, T, O)
        u = torch.einsum("btd,dbkr->btkr", x, A)  # (B, T, K, R)
        return torch.einsum("btkr,bkro->bto", u * ws[:, None, :, None], B)  # (B, T, O)

    def _broadcast(self, c: Tensor, x: Tensor) -> Tensor:
        if c.shape[-1] != self.num_experts:
            raise LorafuseError(
                f"module {self.name}: coefficients of shape {tuple(c.shape)} do not end in "
                f"N={self.num_experts} experts"
            )
        c = c.to(dtype=x.dtype, device=x.device)
        if c.dim() == 1 or c.dim() == x.dim():
            return c  # (N,) or (B, T, N)
        if c.dim() == 2 and x.dim() == 3:
            return c[:, None, :]  # (B, 1, N): one vector per sequence
        raise LorafuseError(
            f"module {self.name}: coefficients of shape {tuple(c.shape)} do not fit input "
            f"{tuple(x.shape)}; use (N,), (B, N) or (B, T, N)"
        )

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, rank={self.rank}, space={self.space}"
