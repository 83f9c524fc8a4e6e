"""The fast path's autograd Functions: hand-written backward passes (fast.joint uses them).

Autograd through the fused layer's slices and broadcast products would take about twice
the ops, each a pass over (M, R, N) or a full-size zero gradient per slice. Three
Functions, M tokens, the joint GEMM's output split as (base O, experts' u R*N, router P):
- `Project`: the joint GEMM x @ [W ; A ; P]^T, split, with one GEMM back for x;
- `Mix`: y + z @ B_cat with z the experts' u mixed by coefficients l (M, N);
- `Routed`: both and, between them, a softmax router l = softmax(p + b) (or |p| + b):
  one Function, so the router costs no autograd nodes and the gradient of x is one GEMM
  over a buffer that the backward fills in place (no concatenation).
Their matrix products go through the plan's fast.gemm.Products (oneDNN on CPUs where MKL
is slow); the mixing step is lorafuse.layer.mix, the reference's own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorafuse.fast import kernels
from lorafuse.layer import mix


def _mix_backward(gz: Tensor, u: Tensor, l: Tensor, h: Tensor | None, gu_out=None):
    # (gu (M, R, N), gl (M, N)) from gz (M, R, N); gu written into gu_out when given.
    lr = l.unsqueeze(1)  # (M, 1, N)
    if h is None:  # deltas
        return torch.mul(gz, lr, out=gu_out), (gz * u).sum(1)
    gh = (gz * lr).sum(-1, keepdim=True)  # (M, R, 1)
    return torch.mul(gh, lr, out=gu_out), torch.addcmul(gz * h, u, gh).sum(1)


class Project(torch.autograd.Function):
    """x (M, D) @ weight^T split into (base output, u, router projection), with autograd.

    The weight's last P rows hold a copy of `proj` (P, D), which receives the gradient.
    Backward is one GEMM for x (the three output gradients side by side times the fused
    weight) where autograd on slices of one output would add them up as full-size zeros.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, proj, widths, ops):
        ctx.save_for_backward(x if proj is not None and proj.requires_grad else None, weight)
        ctx.widths, ctx.ops = widths, ops
        return ops.linear(x, weight, bias).split(widths, -1)  # (M, O), (M, N*R), (M, P)

    @staticmethod
    def backward(ctx, gy, gu, gp):
        x, weight = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            gx = ctx.ops.linear(torch.cat([gy, gu, gp], -1), weight.T)  # (M, O + N*R + P) @ (., D)
        gproj = gp.T @ x if ctx.needs_input_grad[3] else None  # (P, D)
        return gx, None, None, gproj, None, None


class Mix(torch.autograd.Function):
    """y + z @ B with z the experts' projections u (M, R, N) mixed by l (M, N).

    Elementwise products and sums along N (batched (R, N) x (N, 1) matmuls are slower
    here with their backward; they win in the inference path, for the few tokens of
    decoding).
    """

    @staticmethod
    def forward(ctx, y, u, l, B, space, ops):
        z, h = mix(u, l.unsqueeze(1), space)  # (M, R, N), (M, R, 1) or None
        ctx.save_for_backward(u, l, h, B)
        ctx.ops = ops
        return ops.addmm(y, z.flatten(1), B)  # (M, O)

    @staticmethod
    def backward(ctx, g):
        u, l, h, B = ctx.saved_tensors
        gz = ctx.ops.linear(g, B).view_as(u)  # (M, R, N)
        gu, gl = _mix_backward(gz, u, l, h)
        return (
            g,
            gu if ctx.needs_input_grad[1] else None,
            gl if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
        )


class Routed(torch.autograd.Function):
    """x W^T + z @ B with coefficients l = softmax(q + b), q = |p| or p, from one GEMM.

    x (M, D); weight (O + R*N + N, D) = [W ; A ; proj], whose last N rows hold a copy of
    the router's `proj` (N, D); `rbias` (N,) the router's bias. Gradients go to x, proj
    and rbias (the experts and W are frozen). The backward writes the gradients of the
    GEMM's three outputs into one (M, O + R*N + N) buffer and multiplies it by the weight
    once. On CPU in float32 the elementwise work between the GEMMs runs in one compiled
    pass per token (fast.kernels: `kern`, chosen with the plan), else as torch ops.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, proj, rbias, B, widths, space, absolute, ops, kern):
        O, NR, N = widths
        out = ops.linear(x, weight, bias)  # (M, O + R*N + N): base output, u, p
        if kern is not None:
            l, h, z = kernels.forward(kern, out, rbias.contiguous(), widths, space, absolute)
        else:
            _, u, p = out.split(widths, -1)  # (M, R*N), (M, N)
            l = torch.softmax((p.abs() if absolute else p) + rbias, -1)  # (M, N)
            z, h = mix(u.unflatten(-1, (NR // N, N)), l.unsqueeze(1), space)  # (M, R, N)
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, weight, out, l, h, B)
        ctx.widths, ctx.space, ctx.absolute, ctx.kern = widths, space, absolute, kern
        ctx.ops = ops
        return ops.addmm(out[:, :O], z.reshape(-1, NR), B)  # (M, O)

    @staticmethod
    def backward(ctx, g):
        x, weight, out, l, h, B = ctx.saved_tensors
        O, NR, N = ctx.widths
        M, R = g.shape[0], NR // N
        G = g.new_empty(M, O + NR + N)  # gradients of the GEMM's outputs, side by side
        if ctx.kern is not None:
            g = g.contiguous()
            gz = ctx.ops.linear(g, B)  # (M, R*N)
            args = (ctx.widths, ctx.space, ctx.absolute)
            gbias = kernels.backward(ctx.kern, g, gz, out, l, h, G, *args)  # (N,)
        else:
            G[:, :O].copy_(g)
            gz = ctx.ops.linear(g, B).view(M, R, N)  # (M, R, N)
            u = out[:, O : O + NR].unflatten(-1, (R, N))  # (M, R, N)
            _, gl = _mix_backward(gz, u, l, h, G[:, O : O + NR].unflatten(-1, (R, N)))
            gq = l * (gl - (gl * l).sum(-1, keepdim=True))  # (M, N), through the softmax
            gp = G[:, O + NR :]  # (M, N), through |p| if absolute
            if ctx.absolute:
                torch.mul(gq, out[:, O + NR :].sign(), out=gp)
            else:
                gp.copy_(gq)
            gbias = gq.sum(0)  # (N,), after |p|
        gx = ctx.ops.linear(G, weight.T) if ctx.needs_input_grad[0] else None  # (M, D)
        gproj = G[:, O + NR :].T @ x if ctx.needs_input_grad[3] else None  # (N, D)
        gbias = gbias if ctx.needs_input_grad[4] else None
        return gx, None, None, gproj, gbias, None, None, None, None, None, None
