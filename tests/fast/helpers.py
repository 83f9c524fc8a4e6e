"""Helpers shared by the fused layer's tests: small stacked experts, a per-token loop,
and switches that record which of lorafuse.fast's speed-ups ran."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from lorafuse.factors import StackedModule
from lorafuse.fast import choose, gemm, kernels
from lorafuse.layer import FusedLoRALinear

N, R, D, O = 5, 3, 12, 7


def stacked(seed: int = 0, n: int = N, r: int = R, d: int = D, o: int = O) -> StackedModule:
    """Random experts' factors A (n, r, d), B (n, o, r), scalings in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    return StackedModule(
        A=torch.randn(n, r, d, generator=g),
        B=torch.randn(n, o, r, generator=g),
        scale=torch.rand(n, generator=g) + 0.5,
        rank=torch.full((n,), r),
    )


def layer(space: str, seed: int = 0, fast: bool = True) -> tuple[FusedLoRALinear, StackedModule]:
    """A fused layer over a fresh nn.Linear (D, O) and `stacked(seed)`, planned by
    lorafuse.fast.choose (`fast`) or running its reference forward."""
    torch.manual_seed(seed)
    s = stacked(seed)
    planner = choose if fast else None
    return FusedLoRALinear(nn.Linear(D, O), s, space, "test", planner=planner), s


def loop_reference(base, s: StackedModule, x, c, space):
    """Per-token loop: build the mixed matrices for each token and apply them."""
    Bsz, T, _ = x.shape
    out = torch.empty(Bsz, T, s.B.shape[1], dtype=x.dtype)
    for b in range(Bsz):
        for t in range(T):
            l = c[b, t]
            if space == "factors":
                A = sum(l[i] * s.A[i] for i in range(len(l)))
                Bm = sum(l[i] * s.scale[i] * s.B[i] for i in range(len(l)))
                d = Bm @ (A @ x[b, t])
            else:
                d = sum(l[i] * s.scale[i] * (s.B[i] @ (s.A[i] @ x[b, t])) for i in range(len(l)))
            out[b, t] = base(x[b, t]) + d
    return out


def onednn(monkeypatch, on: bool) -> list[tuple[int, ...]]:
    """Set LORAFUSE_ONEDNN; return a list that records the shape of each oneDNN call."""
    monkeypatch.setenv(gemm.SWITCH, "1" if on else "0")
    if on and not gemm.enabled():
        pytest.skip("oneDNN's linear is not usable in this torch build")
    calls: list[tuple[int, ...]] = []
    real = gemm.onednn_linear
    monkeypatch.setattr(
        gemm, "onednn_linear", lambda x, w, b=None: calls.append(x.shape) or real(x, w, b)
    )
    return calls


def built() -> kernels.RoutedKernels:
    """The compiled kernels; skips the test where there is no C compiler."""
    if shutil.which(kernels.compiler()[0]) is None:
        pytest.skip(f"no C compiler ({kernels.compiler()[0]}): the torch ops run instead")
    kern = kernels.routed()
    assert kern is not None, "a C compiler is there but the kernels did not build"
    return kern
