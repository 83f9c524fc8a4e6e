"""FusedLoRALinear: a base linear layer plus N stacked LoRA experts mixed by coefficients.

Two mixing spaces, each two GEMMs whose inner size is N*R over the concatenated factors:
- `factors` (the paper, mttl): y = W x + (sum_i l_i s_i B_i)(sum_i l_i A_i) x
- `deltas`  (full rank, PEFT):  y = W x + sum_i l_i s_i B_i A_i x
No Python loop over experts, no per-token (D, R) matrices and no (tokens, N, O) tensor.
With one-hot coefficients both reduce exactly to the single expert s_i B_i A_i x.

Memory traffic, not arithmetic, is what the experts cost on top of W x, so x is read once:
the layer keeps one weight [W ; A_1 .. A_N ; P] of shape (O + N*R + N, D) and one GEMM
gives the base output, the experts' projections u = x A^T and, for a mixer that exposes
a linear map P of x (a router's `projection`), the router's projection too. The base
layer's weight (and bias) are contiguous views of its first rows: no second copy of W,
and the base layer stays an ordinary nn.Linear with the same parameters (after detach
too; `release()` also gives them storage of their own). Without autograd the second
GEMM accumulates into the base output in place, so the output is a row-strided view of
the joint GEMM's output. A GPT-2 Conv1D keeps its weight (stored (D, O), it cannot be a
contiguous view of the rows), so only the experts' and the router's rows share a GEMM.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lorafuse import gemm
from lorafuse.errors import LorafuseError
from lorafuse.layer_grad import Mix, Project, Routed, _kernel_forward, _kernels
from lorafuse.library import StackedModule

SPACES = ("factors", "deltas")
SERIAL_GEMM = 3 * 2**16  # MKL (2024.2) threads an (M, D) x (D, O) sgemm from M*D*O ~ this
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
    mixer's parameters; the experts' factors are buffers (frozen). A mixer with a
    `projection` (P <= N, D) and `from_projection(p)` (see lorafuse.mixers.static) has
    p = x @ projection^T computed in the layer's GEMM; its coefficients are unchanged.
    The base layer's weight and bias become views of the fused weight; `release()` gives
    them storage of their own again.
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
        self.num_experts, self.rank, self.out_features = N, R, O
        w = base.weight
        # Rank-major order, row r*N + i = expert i's r-th factor: the products with the
        # coefficients (M, R, N) then run along N, not along the short R (vectorised).
        A = stacked.A.to(device=w.device, dtype=w.dtype).transpose(0, 1).reshape(N * R, D)
        sB = stacked.B * stacked.scale.to(stacked.B.dtype)[:, None, None]  # (N, O, R)
        sB = sB.to(device=w.device, dtype=w.dtype).permute(2, 0, 1).reshape(N * R, O)
        self.register_buffer("B_cat", sB, persistent=False)  # (R*N, O), scalings folded in
        # Rows [W (O, Linear only) ; A (N*R) ; room for a mixer's projection (N)].
        self.base_rows = O if isinstance(base, nn.Linear) else 0
        rows = [w.detach()] if self.base_rows else []
        room = torch.zeros(N, D, dtype=w.dtype, device=w.device)
        self.register_buffer("weight_cat", torch.cat([*rows, A, room]), persistent=False)
        bias = getattr(base, "bias", None)
        if self.base_rows and bias is not None:
            zeros = torch.zeros(N * R + N, dtype=w.dtype, device=w.device)
            self.register_buffer("bias_cat", torch.cat([bias.detach(), zeros]), persistent=False)
        else:
            self.bias_cat = None
        self._shared: tuple = (None, None)  # addresses of the base's weight and bias views
        self._plans: dict = {}  # (fuse_base, P) -> the GEMM's rows, see _rows
        self._share_base()
        self.mixer: Mixer | None = None

    @property
    def A_cat(self) -> Tensor:
        """The experts' A factors side by side (D, N*R), a view of the fused weight."""
        start = self.base_rows
        return self.weight_cat[start : start + self.num_experts * self.rank].T

    def __setattr__(self, name: str, value) -> None:
        if name == "mixer":  # any callable: a Module (registered) or a plain function
            self._synced = None  # the projection rows hold another mixer's map
            self._modules.pop("mixer", None)
            self.__dict__.pop("mixer", None)
            if not isinstance(value, nn.Module):
                object.__setattr__(self, name, value)
                return
        super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        mixer = self.mixer
        if mixer is None:
            return self.base(x)
        N, R, O = self.num_experts, self.rank, self.out_features
        lead = x.shape[:-1]
        proj = self._projection(mixer, x)  # (P, D) or None: then the mixer runs on x
        c = None
        if proj is None:
            c = mixer(x)
            if self._row_sparse(c, x):
                d = self._row_sparse_delta(x, c.to(x.dtype))  # (B, T, O)
                y = self._base(x)
                return y + d if y.requires_grad or c.requires_grad else y.add_(d)
        x2 = x.reshape(-1, x.shape[-1])  # (M, D)
        P = 0 if proj is None else proj.shape[0]
        fuse_base = self._base_joins(x2, P)
        weight, bias, widths = self._rows(fuse_base, P)
        grad = torch.is_grad_enabled() and (x.requires_grad or (P and proj.requires_grad))
        rbias = _softmax_bias(mixer, x) if grad and fuse_base and P == N else None
        if rbias is not None:  # a softmax router: the whole layer in one Function
            args = (self.B_cat, widths, self.space, bool(mixer.absolute))
            return Routed.apply(x2, weight, bias, proj, rbias, *args).view(*lead, O)
        if grad:
            y, u, p = Project.apply(x2, weight, bias, proj, widths)
        else:
            joint = gemm.linear(x2, weight, bias)  # (M, O or 0 + R*N + P)
            y, u, p = joint.split_with_sizes(widths, -1)
        # y (M, O) (width 0 if the base runs apart), u (M, R*N), p (M, P)
        if not fuse_base:
            y = self.base(x).reshape(-1, O)  # (M, O)
        if not torch.is_grad_enabled() and P == N:  # a softmax router, by the kernels?
            z = self._kernel_mix(mixer, joint, widths)  # (M, R*N) or None
            if z is not None:
                return gemm.addmm_(y, z, self.B_cat).view(*lead, O)
        if c is None:
            l = mixer.from_projection(p.view(*lead, P)).reshape(-1, N)  # (M, N)
        else:
            l = self._coefficients(c, x)  # (N,) or (M, N)
        if torch.is_grad_enabled() and (y.requires_grad or u.requires_grad or l.requires_grad):
            l = l.expand(y.shape[0], N)  # (M, N)
            return Mix.apply(y, u.unflatten(-1, (R, N)), l, self.B_cat, self.space).view(*lead, O)
        # No autograd here: the second GEMM accumulates straight into the base output.
        return gemm.addmm_(y, self._mix(u, l), self.B_cat).view(*lead, O)

    def _base(self, x: Tensor) -> Tensor:
        # base(x); without autograd a plain nn.Linear's product is lorafuse.gemm's (oneDNN
        # where MKL is slow), as the fused GEMM's is.
        base = self.base
        plain = type(base) is nn.Linear and x.dtype == base.weight.dtype
        if not plain or torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
            return base(x)
        y = gemm.linear(x.reshape(-1, x.shape[-1]), base.weight, base.bias)  # (M, O)
        return y.view(*x.shape[:-1], self.out_features)

    def delta(self, x: Tensor, coefficients: Tensor) -> Tensor:
        """The mixed experts' contribution for input x (..., D) -> (..., O)."""
        if self._row_sparse(coefficients, x):
            return self._row_sparse_delta(x, coefficients.to(x.dtype))
        u = x.reshape(-1, x.shape[-1]) @ self.A_cat  # (M, N*R)
        z = self._mix(u, self._coefficients(coefficients, x))  # (M, N*R)
        return (z @ self.B_cat).view(*x.shape[:-1], self.out_features)  # (..., O)

    def _mix(self, u: Tensor, l: Tensor) -> Tensor:
        # z (M, R*N) with delta = z @ B_cat, from u = x A^T (M, R*N), l (N,) or (M, N).
        N, R = self.num_experts, self.rank
        u = u.unflatten(-1, (R, N))  # (M, R, N)
        lr = l.unsqueeze(-2)  # (1, N) or (M, 1, N)
        if self.space == "deltas":
            return (u * lr).flatten(-2)  # (M, R*N): l_i A_i x
        h = torch.bmm(u, l.unsqueeze(-1)) if l.dim() == 2 else u @ l.unsqueeze(-1)  # (M, R, 1)
        return (h * lr).flatten(-2)  # (M, R*N): l_i (sum_j l_j A_j) x

    def _kernel_mix(self, mixer: Mixer, joint: Tensor, widths) -> Tensor | None:
        # z (M, R*N) for a softmax router by the compiled kernel (CPU, float32), else None;
        # joint is the GEMM's output (M, O or 0 + R*N + N), the router's p its last N columns.
        rbias = _softmax_bias(mixer, joint)
        kern = None if rbias is None else _kernels(joint, rbias, self.B_cat)
        if kern is None:
            return None
        return _kernel_forward(kern, joint, rbias, widths, self.space, bool(mixer.absolute))[2]

    def _projection(self, mixer: Mixer, x: Tensor) -> Tensor | None:
        # The mixer's linear map (P, D) once copied into the weight's room rows, else None.
        proj = getattr(mixer, "projection", None)
        if proj is None:
            return None
        seen = self._synced  # (tensor, version, address, x dtype, answer) of the last call
        if seen and seen[0]() is proj and seen[1:4] == (proj._version, proj.data_ptr(), x.dtype):
            return seen[4]
        room = self.weight_cat[self.base_rows + self.num_experts * self.rank :]  # (N, D)
        fits = (
            hasattr(mixer, "from_projection")
            and proj.dim() == 2
            and proj.shape[0] <= room.shape[0]
            and proj.shape[1] == room.shape[1]
            and proj.dtype == room.dtype == x.dtype
            and proj.device == room.device
        )
        if fits:
            with torch.no_grad():
                room[: proj.shape[0]].copy_(proj)
        answer = proj if fits else None
        self._synced = (weakref.ref(proj), proj._version, proj.data_ptr(), x.dtype, answer)
        return answer

    def _rows(self, fuse_base: bool, P: int) -> tuple[Tensor, Tensor | None, tuple]:
        # (weight rows, bias rows, output widths) of the GEMM, kept per (fuse_base, P).
        key = (fuse_base, P)
        if key not in self._plans:
            NR, start = self.num_experts * self.rank, 0 if fuse_base else self.base_rows
            stop = self.base_rows + NR + P
            bias = self.bias_cat[start:stop] if fuse_base and self.bias_cat is not None else None
            widths = (self.out_features if fuse_base else 0, NR, P)
            self._plans[key] = (self.weight_cat[start:stop], bias, widths)
        return self._plans[key]

    def _base_joins(self, x2: Tensor, P: int) -> bool:
        # Whether the base layer joins the GEMM: its parameters are still views of the
        # fused weight (not replaced or moved), they do not train, and it pays (below).
        if not self.base_rows:
            return False
        base = self.base
        w, b = base.weight, base.bias
        if w.data_ptr() != self._shared[0] or (b is not None and b.data_ptr() != self._shared[1]):
            return False
        if x2.dtype != w.dtype or torch.is_autocast_enabled(x2.device.type):
            return False
        if torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad)):
            return False  # the base layer trains: let autograd see its own parameters
        # On a multi-threaded CPU MKL threads a GEMM past M*D*O ~ SERIAL_GEMM, and each
        # parallel region waits for a second core (~5 ms on a busy machine): when decoding
        # a few tokens through a small layer, two serial GEMMs beat one threaded one.
        if not x2.is_cpu or torch.get_num_threads() == 1 or x2.shape[0] == 1:
            return True  # (a GEMV, M = 1, is threaded from a few thousand weights anyway)
        MD, O = x2.numel(), self.out_features
        return MD * O >= SERIAL_GEMM or MD * (O + self.num_experts * self.rank + P) < SERIAL_GEMM

    def _share_base(self) -> None:
        # Make the base layer's weight (and bias) views of the fused weight's first rows.
        if not self.base_rows:
            return
        O = self.out_features
        self.base.weight.data = self.weight_cat[:O]
        if self.bias_cat is not None:
            self.base.bias.data = self.bias_cat[:O]
        self._shared = (
            self.weight_cat.data_ptr(),
            self.bias_cat is not None and self.bias_cat.data_ptr(),
        )

    def release(self) -> nn.Module:
        """The base layer with parameters of their own (no views of the fused weight)."""
        base = self.base
        for name in ("weight", "bias"):
            p = getattr(base, name, None)
            if p is not None and p.untyped_storage().nbytes() != p.nbytes:
                p.data = p.data.clone()
        self._shared = (None, None)
        return base

    def _apply(self, fn, recurse=True):
        # .to(), .half(), ...: convert once and keep the base layer's views of the result.
        shared = self.base_rows and self.base.weight.data_ptr() == self.weight_cat.data_ptr()
        super()._apply(fn, recurse)
        if shared:
            self._share_base()
        self._synced, self._plans = None, {}
        return self

    def _row_sparse(self, c: Tensor, x: Tensor) -> bool:
        # Per-sequence coefficients using at most half of the experts in every row (one-hot
        # rows of the matrix, ensembles, the oracle): gather each row's experts instead.
        if c.dim() != 2 or x.dim() != 3 or c.shape != (x.shape[0], self.num_experts):
            return False
        return 2 * int((c != 0).sum(-1).max()) <= self.num_experts

    def _row_sparse_delta(self, x: Tensor, c: Tensor) -> Tensor:
        # Per-row (not per-token) mixed factors of the K experts each row uses.
        N, R, O = self.num_experts, self.rank, self.out_features
        K = max(1, int((c != 0).sum(-1).max()))
        idx = c.abs().topk(K, dim=-1).indices  # (B, K)
        w = c.gather(-1, idx)  # (B, K)
        A = self.A_cat.T.reshape(R, N, -1).transpose(0, 1)[idx]  # (B, K, R, D)
        B = self.B_cat.view(R, N, O).transpose(0, 1)[idx]  # (B, K, R, O), scalings included
        if self.space == "factors":
            A_mix = torch.einsum("bkrd,bk->bdr", A, w)  # (B, D, R)
            B_mix = torch.einsum("bkro,bk->bro", B, w)  # (B, R, O)
            return torch.bmm(torch.bmm(x, A_mix), B_mix)  # (B, T, O)
        u = torch.einsum("btd,bkrd->btkr", x, A)  # (B, T, K, R)
        return torch.einsum("btkr,bkro->bto", u * w[:, None, :, None], B)  # (B, T, O)

    def _coefficients(self, c: Tensor, x: Tensor) -> Tensor:
        # Coefficients as (N,) or one row per token (M, N), M = x.numel() / D.
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

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, rank={self.rank}, space={self.space}"


def _softmax_bias(mixer: Mixer, x: Tensor) -> Tensor | None:
    # The bias b (N,) of a mixer whose coefficients are softmax(|p| + b) or softmax(p + b)
    # (see lorafuse.mixers.static), if its dtype and device are x's; else None.
    b = getattr(mixer, "softmax_bias", None)
    return b if b is not None and b.dtype == x.dtype and b.device == x.device else None
