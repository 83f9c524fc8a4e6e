"""The fused layer's plans: small objects with a straight forward, equal to the reference.

A plan is built by lorafuse.fast.choose for one layer and one mixer, with everything
that does not change between calls decided then: which products (fast.gemm.Products),
whether compiled kernels run (fast.kernels), where the coefficients come from, which
rows the GEMM reads. Its forward then only computes. Four kinds:
- `Joint` (inference): one GEMM x [W ; A ; P]^T gives the base output, the experts'
  projections and a projected mixer's p; the mixed experts accumulate into the base
  output in place (a softmax router's mixing step by the compiled kernel on CPU);
- `Chosen` (inference, a top-k projected mixer over many experts): a call of a few
  tokens (decoding) reads only each token's K experts, gathered; more tokens run Joint;
- `Folded` (inference, fixed coefficients that use few experts): global coefficients are
  folded into one pair of factors when the plan is made; per-sequence coefficients
  gather each sequence's experts (their indices found when the plan is made);
- `Trained` (autograd): the joint GEMM and the mix as hand-written autograd Functions
  (fast.functions); for a dense softmax router the whole layer is one Function.
No plan reads the environment, checks the mixer's kind or syncs the device per call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lorafuse.fast import kernels
from lorafuse.fast.functions import Mix, Project, Routed
from lorafuse.fast.gemm import Products
from lorafuse.fast.rows import JointRows
from lorafuse.layer import mix

MIX_WORK = 2**23  # M*D*(O + N*R) from which Project + Mix beat autograd (bench/plans.py)


def base_output(layer: nn.Module, ops: Products, plain: bool) -> Callable[[Tensor], Tensor]:
    """x (M, D) -> the base layer's output (M, O): by `ops` for a plain nn.Linear (oneDNN
    where MKL is slow), else by the base layer itself."""
    base, O = layer.base, layer.out_features
    if plain:
        return lambda x2: ops.linear(x2, base.weight, base.bias)  # (M, O)
    return lambda x2: base(x2).reshape(-1, O)  # (M, O)


class _Plan:
    """What every plan holds: its layer, mixer and products, and the layer's sizes."""

    def __init__(self, layer, ops: Products, proj: Tensor | None = None):
        self.layer, self.ops, self.mixer = layer, ops, layer.mixer
        self.B = layer.B_cat  # (R*N, O); a move of the layer chooses its plans again
        N, R, O = layer.num_experts, layer.rank, layer.out_features
        self.N, self.R, self.O, self.space = N, R, O, layer.space
        self.projected = proj is not None  # the mixer's map rides in the joint GEMM
        self.P = proj.shape[0] if self.projected else 0


def _replanned(layer: nn.Module, x: Tensor) -> Tensor:
    # The buffer no longer holds the layer's weights (a pointer check, no device sync):
    # choose the plans again, from the weights as they are now, and run.
    layer.replan()
    return layer(x)


class Joint(_Plan):
    """Inference: one GEMM for the base, the experts and a projected mixer (module doc).

    `proj`: the mixer projects (its map fits the buffer's room rows); `rbias`: it is a
    dense softmax router with that bias, and `kern` its compiled mixing step (or None).
    The base's rows join the GEMM at every size: a second, separate GEMM for the base
    costs its own fixed overhead, which is what decoding a few tokens is made of (and
    MKL threads even the smallest joint GEMMs of a decoded token, bench/routing.py).
    """

    kind = "inference-joint"

    def __init__(self, layer, rows: JointRows, ops: Products, proj, rbias, kern):
        super().__init__(layer, ops, proj)
        self.rows = rows
        self.weight, self.bias, self.widths = rows.slices(True, self.P, aligned=True)
        self.width = sum(self.widths)  # the GEMM's aligned output may be wider: not read
        self.joins = rows.top > 0
        self.base_out = base_output(layer, ops, plain=self.joins)
        self.rbias, self.kern, self.absolute = rbias, kern, bool(getattr(self.mixer, "absolute", 0))
        self.factors = self.space == "factors"
        if kern is not None:
            self.mixed = self._kernel
        elif self.projected:
            self.mixed = self._projected
        else:
            self.mixed = self._coefficients

    def __call__(self, x: Tensor) -> Tensor:
        if not self.rows.holds(self.layer):  # W replaced, or taken by another fused layer
            return _replanned(self.layer, x)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])  # x2 (M, D)
        if self.projected:
            self.rows.sync(self.mixer.projection)
        joint = self.ops.linear(x2, self.weight, self.bias)  # (M, O or 0 + R*N + P + pad)
        y = joint[:, : self.O] if self.joins else self.base_out(x2)  # (M, O)
        z = self.mixed(x, joint, self.widths)  # (M, R*N)
        return self.ops.addmm_(y, z, self.B).view(*lead, self.O)

    def _projected(self, x: Tensor, joint: Tensor, widths) -> Tensor:
        _, u, p = joint[:, : self.width].split_with_sizes(widths, -1)  # (M, R*N), (M, P)
        l = self.mixer.from_projection(p.view(*x.shape[:-1], -1)).reshape(-1, self.N)  # (M, N)
        return mix(u.unflatten(-1, (self.R, self.N)), l.unsqueeze(1), self.space)[0].flatten(1)

    def _coefficients(self, x: Tensor, joint: Tensor, widths) -> Tensor:
        u = joint[:, widths[0] : widths[0] + widths[1]]  # (M, R*N)
        l = self.layer.token_coefficients(self.mixer(x), x)  # (N,) or (M, N)
        return mix(u.unflatten(-1, (self.R, self.N)), l.unsqueeze(-2), self.space)[0].flatten(1)

    def _kernel(self, x: Tensor, joint: Tensor, widths) -> Tensor:
        return kernels.mixed(self.kern, joint, self.rbias, widths, self.factors, self.absolute)


class Folded(_Plan):
    """Inference with fixed coefficients c (N,) or (B, N) using at most N/2 experts per row
    (module doc); the experts' factors are read from the layer, W from the base layer."""

    kind = "inference-folded"

    def __init__(self, layer, c: Tensor, ops: Products, plain: bool):
        super().__init__(layer, ops)
        N, R, O = self.N, self.R, self.O
        self.base_out = base_output(layer, ops, plain)
        A = layer.A_rows.view(R, N, -1)  # (R, N, D)
        B = layer.B_cat.view(R, N, O)  # (R, N, O), scalings included
        c = c.to(A)
        K = max(1, int((c != 0).sum(-1).max()))  # the most experts a row uses (one sync)
        self.rows = None if c.dim() == 1 else c.shape[0]
        if c.dim() == 1:  # one pair of factors, (Rf, D) and (Rf, O)
            if self.space == "factors":
                self.A_f = torch.einsum("rnd,n->rd", A, c)  # (R, D): sum_i l_i A_i
                self.B_f = torch.einsum("rno,n->ro", B, c)  # (R, O): sum_i l_i s_i B_i
            else:
                keep = c.abs().topk(K).indices  # (K,)
                self.A_f = (A[:, keep] * c[keep, None]).reshape(-1, A.shape[-1])  # (R*K, D)
                self.B_f = B[:, keep].reshape(-1, O)  # (R*K, O)
        else:  # per sequence: each row's K experts, gathered at each call
            self.idx = c.abs().topk(K, dim=-1).indices  # (B, K)
            self.w = c.gather(-1, self.idx)  # (B, K)

    def __call__(self, x: Tensor) -> Tensor:
        if self.rows is not None and (x.dim() != 3 or x.shape[0] != self.rows):
            return self.layer.base(x) + self.layer.delta(x, self.mixer(x))  # its error
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])  # x2 (M, D)
        y = self.base_out(x2)  # (M, O)
        if self.rows is None:
            u = self.ops.linear(x2, self.A_f)  # (M, Rf)
            return self.ops.addmm_(y, u, self.B_f).view(*lead, self.O)
        return y.view(*lead, self.O).add_(self._gathered(x))

    def _gathered(self, x: Tensor) -> Tensor:
        # The mixed experts' contribution (B, T, O) from each sequence's K experts.
        N, R, O, idx, w = self.N, self.R, self.O, self.idx, self.w
        A = self.layer.A_rows.view(R, N, -1).transpose(0, 1)[idx]  # (B, K, R, D)
        B = self.layer.B_cat.view(R, N, O).transpose(0, 1)[idx]  # (B, K, R, O)
        if self.space == "factors":
            A_mix = torch.einsum("bkrd,bk->bdr", A, w)  # (B, D, R)
            B_mix = torch.einsum("bkro,bk->bro", B, w)  # (B, R, O)
            return torch.bmm(torch.bmm(x, A_mix), B_mix)  # (B, T, O)
        u = torch.einsum("btd,bkrd->btkr", x, A)  # (B, T, K, R)
        return torch.einsum("btkr,bkro->bto", u * w[:, None, :, None], B)  # (B, T, O)


class Chosen(_Plan):
    """Inference with a top-k projected mixer over many experts: a few tokens read only
    their K chosen experts' factors.

    Joint's GEMM reads every expert's A (N*R rows) for every call; decoding a token is
    bound by those reads, not by arithmetic. Here the base output and the mixer's p come
    from the base's and the projection's rows alone; each token's K experts (the nonzero
    coefficients) are then gathered, (R, M, K, D) and (R, M, K, O): M*K*R*(D+O) values
    read instead of N*R*(D+O). A call of more than N / (2K) rows, where the gathered
    rows would outnumber the experts' own, runs `joint` instead.
    """

    kind = "inference-chosen"

    def __init__(self, layer, joint: Joint, proj: Tensor, k: int):
        super().__init__(layer, joint.ops, proj)
        self.joint, self.K = joint, k
        self.base_out = base_output(layer, joint.ops, plain=joint.joins)
        self.most_rows = self.N // (2 * k)  # above: Joint

    def __call__(self, x: Tensor) -> Tensor:
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])  # x2 (M, D)
        if x2.shape[0] > self.most_rows:
            return self.joint(x)
        N, R, O = self.N, self.R, self.O
        y = self.base_out(x2)  # (M, O)
        p = self.ops.linear(x2, self.mixer.projection)  # (M, P)
        l = self.mixer.from_projection(p.view(*lead, -1)).reshape(-1, N)  # (M, N)
        w, idx = l.topk(self.K, -1)  # (M, K): every nonzero coefficient (at most K)
        w = w.to(x2.dtype)
        A = self.layer.A_rows.view(R, N, -1)[:, idx]  # (R, M, K, D)
        B = self.B.view(R, N, O)[:, idx]  # (R, M, K, O)
        u = torch.einsum("rmkd,md->mrk", A, x2)  # (M, R, K): A_k x
        z = mix(u, w.unsqueeze(1), self.space)[0]  # (M, R, K), over the chosen experts
        return y.add_(torch.einsum("rmko,mrk->mo", B, z)).view(*lead, O)


class Trained(_Plan):
    """Autograd: the joint GEMM and the mix as hand-written Functions (fast.functions).

    `rbias` (a dense softmax router's bias) with the base's rows in the buffer: the
    whole layer is one Function (`Routed`), its mixing step by `kern` on CPU; otherwise
    `Project` then `Mix`, the base joined when `frozen` (its weight takes no gradient).
    Those two Functions cost a fixed overhead per call: below MIX_WORK (M*D*(O + N*R),
    a few hundred tokens through a small layer) autograd through the reference is as
    fast, and runs.
    """

    kind = "train"

    def __init__(self, layer, rows: JointRows, ops: Products, proj, rbias, kern, frozen: bool):
        super().__init__(layer, ops, proj)
        self.rows = rows
        self.joins = rows.top > 0 and frozen
        self.weight, self.bias, self.widths = rows.slices(self.joins, self.P)
        self.base_out = base_output(layer, ops, plain=False)
        self.rbias, self.kern = rbias, kern
        self.absolute = bool(getattr(self.mixer, "absolute", False))
        self.routed = rbias is not None and self.joins
        self.kind = "train-routed" if self.routed else "train-mix"
        width = layer.A_rows.shape[1] * (self.O + self.N * self.R)  # D*(O + N*R)
        self.min_rows = 0 if self.routed else -(-MIX_WORK // width)

    def __call__(self, x: Tensor) -> Tensor:
        if not self.rows.holds(self.layer):  # W replaced, or taken by another fused layer
            return _replanned(self.layer, x)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])  # x2 (M, D)
        if x2.shape[0] < self.min_rows:  # too small for the Functions to pay
            return self.layer.base(x) + self.layer.delta(x, self.mixer(x))  # (..., O)
        proj = self.mixer.projection if self.projected else None  # (P, D)
        if self.projected:
            self.rows.sync(proj)
        if self.routed:
            args = (self.B, self.widths, self.space, self.absolute, self.ops, self.kern)
            return Routed.apply(x2, self.weight, self.bias, proj, self.rbias, *args).view(
                *lead, self.O
            )
        y, u, p = Project.apply(x2, self.weight, self.bias, proj, self.widths, self.ops)
        if not self.joins:
            y = self.base_out(x2)  # (M, O)
        if self.projected:
            l = self.mixer.from_projection(p.view(*lead, -1)).reshape(-1, self.N)  # (M, N)
        else:
            l = self.layer.token_coefficients(self.mixer(x), x)  # (N,) or (M, N)
        l = l.expand(y.shape[0], self.N)  # (M, N)
        u = u.unflatten(-1, (self.R, self.N))  # (M, R, N)
        return Mix.apply(y, u, l, self.B, self.space, self.ops).view(*lead, self.O)
