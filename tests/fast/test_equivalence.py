"""Every plan equals the reference forward: values and gradients, every mixer kind, both
spaces, float32 and bfloat16, nn.Linear and GPT-2 Conv1D base layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafuse.fast import choose
from lorafuse.layer import FusedLoRALinear
from lorafuse.mixers import Fixed, Learned
from lorafuse.mixers.hierarchical import HCRouter
from lorafuse.mixers.routers import ArrowRouter, LinearRouter
from tests.fast.helpers import D, N, O, R, stacked

B, T = 2, 5


class Table(nn.Module):
    """Learnable coefficients of a given shape, softmax(logits), optionally row-sparse."""

    def __init__(self, shape, sparse: bool = False):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(shape))
        mask = torch.zeros(shape)
        mask[..., :2] = 1.0  # 2 of N=5 experts per row (a mixer: the joint plan still)
        self.register_buffer("mask", mask if sparse else torch.ones(shape))

    def forward(self, x):
        return (torch.softmax(self.logits, -1) * self.mask).to(x.dtype)


def _router(**kw) -> LinearRouter:
    r = LinearRouter(D, N, init=torch.randn(N, D), **kw)
    with torch.no_grad():
        r.bias.normal_()
    return r


MIXERS = {
    "fixed-global": lambda: Fixed(torch.softmax(torch.randn(N), -1)),
    "fixed-one-hot-rows": lambda: Fixed(torch.eye(N)[[1, 3]]),
    "fixed-sparse-rows": lambda: Fixed(torch.tensor([[0.0, 0.7, 0, 0, -0.2], [0.5, 0, 0, 0, 0]])),
    "fixed-sequence": lambda: Fixed(torch.softmax(torch.randn(B, N), -1)),
    "fixed-token": lambda: Fixed(torch.softmax(torch.randn(B, T, N), -1)),
    "global": lambda: Table((N,)),
    "sequence": lambda: Table((B, N)),
    "sequence-sparse": lambda: Table((B, N), sparse=True),
    "token": lambda: Table((B, T, N)),
    "learned": lambda: Learned(N),
    "linear-softmax": lambda: _router(absolute=False),
    "linear-absolute": lambda: _router(absolute=True),
    "linear-top-k": lambda: _router(top_k=2),
    "arrow-top-k": lambda: ArrowRouter(
        nn.functional.normalize(torch.randn(N, D), dim=-1), top_k=2, temperature=0.5
    ),
    "hc": lambda: HCRouter(D, torch.tensor([0, 0, 1, 1, 2]), init=torch.randn(3, D)),
}


FOLDED = {"fixed-global", "fixed-one-hot-rows", "fixed-sparse-rows"}
ROUTED = {"linear-softmax", "linear-absolute"}  # dense softmax routers


def _base(kind: str, dtype) -> nn.Module:
    if kind == "linear":
        return nn.Linear(D, O).to(dtype).requires_grad_(False)
    from transformers.pytorch_utils import Conv1D

    return Conv1D(O, D).to(dtype).requires_grad_(False)  # weight (D, O)


def _run(f: FusedLoRALinear, x: torch.Tensor, w: torch.Tensor, fast: bool):
    """(output, gradients to x and the mixer's parameters, inference output), with the
    layer's plans (`fast`) or with its reference forward."""
    f.planner = choose if fast else None
    f.replan()
    wrt = [x, *(p for p in f.mixer.parameters() if p.requires_grad)]
    y = f(x)
    grads = torch.autograd.grad((y.float() * w).sum(), wrt)
    with torch.inference_mode():
        y_inf = f(x)
    return y.detach(), grads, y_inf


@pytest.mark.parametrize("mixer", list(MIXERS))
@pytest.mark.parametrize("space", ["factors", "deltas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("base", ["linear", "conv1d"])
def test_fast_equals_reference(mixer, space, dtype, base):
    torch.manual_seed(0)
    f = FusedLoRALinear(_base(base, dtype), stacked(), space, "test", planner=choose)
    f.mixer = MIXERS[mixer]()
    x = torch.randn(B, T, D).to(dtype).requires_grad_()
    w = torch.randn(B, T, O)
    got, got_grads, got_inf = _run(f, x, w, fast=True)
    # the plans these calls took (the reference runs only where no plan is chosen)
    routed = mixer in ROUTED and base == "linear" and dtype == torch.float32  # fp32 routers
    assert f.train_plan.kind == ("train-routed" if routed else "train-mix")
    assert f.inference_plan.kind == ("inference-folded" if mixer in FOLDED else "inference-joint")
    ref, ref_grads, ref_inf = _run(f, x, w, fast=False)
    if dtype == torch.float32:
        tol = {"atol": 1e-5, "rtol": 1e-5}
        gtol = {"atol": 1e-4, "rtol": 1e-4}
    else:  # bfloat16: 8 bits of mantissa, sums in another order
        tol = {"atol": 0.05 * float(ref.float().abs().max()), "rtol": 0.02}
        gtol = None
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(got_inf, ref, **tol)
    torch.testing.assert_close(ref_inf, ref, atol=0, rtol=0)
    assert len(got_grads) == len(ref_grads)
    for g, e in zip(got_grads, ref_grads):
        if gtol is None:
            gtol_ = {"atol": 0.05 * float(e.float().abs().max()) + 1e-3, "rtol": 0.05}
            torch.testing.assert_close(g.float(), e.float(), **gtol_)
        else:
            torch.testing.assert_close(g, e, **gtol)


@pytest.mark.parametrize("space", ["factors", "deltas"])
def test_trainable_base_layer_gets_the_same_gradients(space):
    # A base layer that trains runs apart from the joint GEMM: autograd sees its weight.
    torch.manual_seed(0)
    f = FusedLoRALinear(nn.Linear(D, O), stacked(), space, "test", planner=choose)
    f.mixer = _router()
    assert f.train_plan.kind == "train-mix"  # not the Routed Function: W takes a gradient
    x = torch.randn(B, T, D, requires_grad=True)
    wrt = [x, f.base.weight, f.base.bias, f.mixer.weight, f.mixer.bias]
    got = torch.autograd.grad(f(x).pow(2).sum(), wrt)
    f.planner = None
    f.replan()
    expected = torch.autograd.grad(f(x).pow(2).sum(), wrt)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("router", ["arrow", "linear"])
@pytest.mark.parametrize("space", ["factors", "deltas"])
@pytest.mark.parametrize("base", ["linear", "conv1d"])
def test_only_the_chosen_experts_equal_the_reference(monkeypatch, router, space, base):
    # A top-2 router over 16 experts: calls of at most 16 / (2 * 2) = 4 rows read only
    # each token's 2 experts (Chosen); more rows run Joint. Both equal the reference.
    from lorafuse import fast

    monkeypatch.setattr(fast, "CHOSEN_WORK", 0)  # at any width (the rule's size threshold)
    n, k = 16, 2
    torch.manual_seed(0)
    f = FusedLoRALinear(_base(base, torch.float32), stacked(n=n), space, "t", planner=choose)
    if router == "arrow":
        f.mixer = ArrowRouter(nn.functional.normalize(torch.randn(n, D), dim=-1), k, 0.7)
    else:
        f.mixer = LinearRouter(D, n, init=torch.randn(n, D), top_k=k)
        with torch.no_grad():
            f.mixer.bias.normal_()
    plan = f.inference_plan
    assert (plan.kind, plan.K) == ("inference-chosen", k)
    joint_rows = []
    joint = plan.joint
    plan.joint = lambda x: joint_rows.append(x.shape[:-1].numel()) or joint(x)
    shapes = [(1, 1), (4, 1), (2, 2), (1, 5), (2, 5)]  # rows 1, 4, 4: chosen; 5, 10: Joint
    xs = [torch.randn(*s, D) for s in shapes]
    with torch.inference_mode():
        got = [f(x) for x in xs]
        f.planner = None
        f.replan()
        want = [f(x) for x in xs]
    assert joint_rows == [5, 10]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_chosen_only_for_many_experts_and_a_small_k(monkeypatch):
    from lorafuse import fast

    monkeypatch.setattr(fast, "CHOSEN_WORK", 0)
    f = FusedLoRALinear(nn.Linear(D, O), stacked(n=16), "factors", "t", planner=choose)
    protos = nn.functional.normalize(torch.randn(16, D), dim=-1)
    f.mixer = ArrowRouter(protos, 5, 1.0)  # 4 * 5 > 16: Joint reads all, as cheaply
    assert f.inference_plan.kind == "inference-joint"
    f.mixer = ArrowRouter(protos, None, 1.0)  # dense: every expert is used
    assert f.inference_plan.kind == "inference-joint"
    f.mixer = ArrowRouter(protos, 4, 1.0)
    assert f.inference_plan.kind == "inference-chosen"
    monkeypatch.setattr(fast, "CHOSEN_WORK", 16 * R * (D + O) + 1)  # too little to read
    f.replan()
    assert f.inference_plan.kind == "inference-joint"


def test_a_foreign_mixer_naming_top_k_keeps_joint(monkeypatch):
    # A projected mixer of another kind whose `top_k` means something else (here: it
    # uses every expert) must not lose experts to Chosen.
    from lorafuse import fast

    monkeypatch.setattr(fast, "CHOSEN_WORK", 0)
    n = 16
    protos = torch.randn(n, D)

    class Everyone(nn.Module):
        top_k = 2  # not a promise of 2 nonzero coefficients

        @property
        def projection(self):
            return protos

        def from_projection(self, p):
            return torch.softmax(p, -1)  # all 16 experts

        def forward(self, x):
            return self.from_projection(x @ protos.T)

    f = FusedLoRALinear(nn.Linear(D, O), stacked(n=n), "deltas", "t", planner=choose)
    f.mixer = Everyone()
    assert f.inference_plan.kind == "inference-joint"
    x = torch.randn(1, 1, D)
    with torch.inference_mode():
        got = f(x)
        torch.testing.assert_close(got, f.base(x) + f.delta(x, f.mixer(x)), atol=1e-5, rtol=1e-5)
