"""The plans equal the reference with their switches on and off.

LORAFUSE_ONEDNN (fast.gemm) and LORAFUSE_CPU_KERNELS (fast.kernels) are read when the
plans are chosen; here every mixer kind runs with enough tokens (M = 80 >= gemm.MIN_ROWS)
for oneDNN to take the products, with and without autograd, and the layer's output and
gradients must be the reference's whichever switches are set. Also: moving or casting a
layer, and release(), keep the plans equal to the reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafuse.fast import choose, gemm, kernels
from lorafuse.layer import FusedLoRALinear
from lorafuse.mixers import Fixed, Learned
from lorafuse.mixers.routers import ArrowRouter, LinearRouter
from tests.fast.helpers import D, N, O, built, onednn, stacked

B, T = 2, 40  # M = 80 tokens: oneDNN's products apply (from 64 rows)


def _linear_router(**kw) -> LinearRouter:
    r = LinearRouter(D, N, init=torch.randn(N, D), **kw)
    with torch.no_grad():
        r.bias.normal_()
    return r


class _PerSequence(nn.Module):
    """Learnable (B, N) coefficients; `sparse`: two experts per row."""

    def __init__(self, sparse: bool):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(B, N))
        self.register_buffer("mask", (torch.arange(N) < (2 if sparse else N)).float())

    def forward(self, x):
        return torch.softmax(self.logits, -1) * self.mask


MIXERS = {
    "fixed-global": lambda: Fixed(torch.softmax(torch.randn(N), -1)),
    "fixed-token": lambda: Fixed(torch.softmax(torch.randn(B, T, N), -1)),
    "one-hot-rows": lambda: Fixed(torch.eye(N)[[1, 3]]),
    "sequence": lambda: _PerSequence(sparse=False),
    "sequence-sparse": lambda: _PerSequence(sparse=True),
    "learned": lambda: Learned(N),
    "linear-softmax": lambda: _linear_router(absolute=False),
    "linear-absolute": lambda: _linear_router(absolute=True),
    "linear-top-k": lambda: _linear_router(top_k=2),
    "arrow-top-k": lambda: ArrowRouter(nn.functional.normalize(torch.randn(N, D), dim=-1), 2),
}


def _outputs(f: FusedLoRALinear, x: torch.Tensor, w: torch.Tensor):
    """(output, gradients to x and the mixer's trainable parameters, inference output)."""
    wrt = [x, *(p for p in f.mixer.parameters() if p.requires_grad)]
    y = f(x)
    grads = torch.autograd.grad((y * w).sum(), wrt)
    with torch.inference_mode():
        y_inf = f(x)
    return y.detach(), grads, y_inf


@pytest.mark.parametrize("mixer", list(MIXERS))
@pytest.mark.parametrize("space", ["factors", "deltas"])
@pytest.mark.parametrize("dnn", [False, True], ids=["torch", "onednn"])
@pytest.mark.parametrize("kern", [False, True], ids=["ops", "kernels"])
def test_switches_keep_the_reference(mixer, space, dnn, kern, monkeypatch):
    monkeypatch.setenv(kernels.SWITCH, "1" if kern else "0")
    if kern:
        built()
    calls = onednn(monkeypatch, dnn)
    torch.manual_seed(0)
    base = nn.Linear(D, O).requires_grad_(False)
    f = FusedLoRALinear(base, stacked(), space, "test", planner=choose)
    g = FusedLoRALinear(nn.Linear(D, O), stacked(), space, "test")
    g.base.load_state_dict(base.state_dict())
    f.mixer = g.mixer = MIXERS[mixer]()
    x = torch.randn(B, T, D, requires_grad=True)
    w = torch.randn(B, T, O)
    got, got_grads, got_inf = _outputs(f, x, w)
    if dnn:  # the switch took effect: at least the inference call ran on oneDNN
        assert calls and all(shape[0] >= gemm.MIN_ROWS for shape in calls)
    ref, ref_grads, ref_inf = _outputs(g, x, w)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_inf, ref_inf, atol=1e-5, rtol=1e-5)
    assert len(got_grads) == len(ref_grads)
    for a, e in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("space", ["factors", "deltas"])
def test_moves_and_casts_keep_the_reference(space):
    # .to() drops the joint buffer; it is rebuilt from the moved base layer, and the base
    # layer's weight is again a view of it (one copy).
    torch.manual_seed(0)
    f = FusedLoRALinear(
        nn.Linear(D, O).requires_grad_(False), stacked(), space, "test", planner=choose
    )
    f.mixer = _linear_router()
    x = torch.randn(B, T, D)
    with torch.inference_mode():
        before = f(x)
    for dtype in (torch.float64, torch.float32):
        f.to(dtype)
        f.mixer.to(dtype)
        xd = x.to(dtype)
        with torch.inference_mode():
            got = f(xd)
        ref = f.base(xd) + f.delta(xd, f.mixer(xd))
        torch.testing.assert_close(got, ref)
        assert f.base.weight.data_ptr() == f.state["rows"].rows.data_ptr()
        assert f.inference_plan.rows is f.state["rows"]  # chosen again after the move
    torch.testing.assert_close(got, before)
    f.to("cpu")  # a move to where it already is: rebuilt, same numbers
    with torch.inference_mode():
        torch.testing.assert_close(f(x), before)


def test_release_after_training_steps():
    # After the fast path trained a router (the base weight a view of its buffer), the
    # released base layer owns its parameters and equals the original; the layer then
    # runs its reference forward, with the same output.
    torch.manual_seed(0)
    base = nn.Linear(D, O).requires_grad_(False)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    f = FusedLoRALinear(base, stacked(), "factors", "test", planner=choose)
    f.mixer = router = _linear_router()
    opt = torch.optim.SGD(router.parameters(), lr=0.1)
    x = torch.randn(B, T, D)
    for _ in range(2):
        f(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.inference_mode():
        fast_out = f(x)
    assert f.release() is base and f.train_plan is None and f.inference_plan is None
    for name, p in base.named_parameters():
        assert p.untyped_storage().nbytes() == p.nbytes, name
        assert torch.equal(p, before[name])
    with torch.inference_mode():
        torch.testing.assert_close(f(x), fast_out, atol=1e-5, rtol=1e-5)
