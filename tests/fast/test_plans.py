"""The plans' own machinery: which plan each mixer gets, the shared buffer, chosen once."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from lorafuse import fast
from lorafuse.errors import LorafuseError
from lorafuse.fast import choose, describe, kernels
from lorafuse.fast.functions import Routed
from lorafuse.fast.plans import Joint
from lorafuse.fast.rows import ALIGN
from lorafuse.layer import FusedLoRALinear
from lorafuse.mixers import Fixed, Learned, routers
from lorafuse.mixers.hierarchical import HCRouter
from lorafuse.mixers.protocol import Mixer, ProjectedMixer, SoftmaxRouter
from lorafuse.mixers.routers import ArrowRouter, LinearRouter
from tests.fast.helpers import D, N, O, built, layer, loop_reference, onednn, stacked


def _router_reference(f, s, x, router, space):
    """Plain autograd: the base layer plus the per-token loop, coefficients router(x)."""
    return loop_reference(f.base, s, x, router(x), space)


def _counting(fn, calls):
    def counted(*args):
        calls.append(1)
        return fn(*args)

    return counted


@pytest.mark.parametrize("space", ["factors", "deltas"])
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("dnn", [False, True])
def test_router_in_the_gemm_values_and_gradients(space, absolute, kernel, dnn, monkeypatch):
    # A dense softmax router trains through one Function (Routed), its mixing step by the
    # compiled kernels or by torch ops, its products by oneDNN (74 tokens, padded to 80
    # rows) or by torch: the switches read when the plan is chosen.
    monkeypatch.setenv(kernels.SWITCH, "1" if kernel else "0")
    calls_dnn = onednn(monkeypatch, dnn)
    if kernel:
        built()
    f, s = layer(space)
    f.base.requires_grad_(False)
    router = LinearRouter(D, N, init=torch.randn(N, D), absolute=absolute)
    with torch.no_grad():
        router.bias.normal_()
    f.mixer = router
    assert f.train_plan.kind == "train-routed"
    assert (f.train_plan.kern is not None) == kernel
    assert (f.inference_plan.kern is not None) == kernel  # inference uses them too
    calls = []
    monkeypatch.setattr(Routed, "apply", _counting(Routed.apply, calls))
    T = 37 if dnn else 4
    x = torch.randn(2, T, D, requires_grad=True)
    w = torch.randn(2, T, O)
    got = f(x)
    grads = torch.autograd.grad((got * w).sum(), [x, router.weight, router.bias])
    # forward: the joint product and the experts' B; backward: their two products
    assert len(calls_dnn) == (4 if dnn else 0)
    assert len(calls) == 1
    ref = _router_reference(f, s, x, router, space)
    expected = torch.autograd.grad((ref * w).sum(), [x, router.weight, router.bias])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    mixed = []
    monkeypatch.setattr(kernels, "mixed", _counting(kernels.mixed, mixed))
    with torch.inference_mode():
        torch.testing.assert_close(f(x), ref, atol=1e-5, rtol=1e-5)
    assert len(mixed) == (1 if kernel else 0)  # inference's mixing step: z alone, compiled


def test_router_without_x_gradient_trains_its_weight():
    # The first layers' inputs need no gradient; the router's weight and bias still get one.
    f, s = layer("factors")
    f.base.requires_grad_(False)
    router = LinearRouter(D, N, init=torch.randn(N, D), absolute=False)
    f.mixer = router
    x = torch.randn(2, 4, D)
    got = torch.autograd.grad(f(x).pow(2).sum(), [router.weight, router.bias])
    ref = _router_reference(f, s, x, router, "factors")
    expected = torch.autograd.grad(ref.pow(2).sum(), [router.weight, router.bias])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_router_changes_reach_the_gemm():
    # The joint buffer keeps a copy of the router's weight: an optimiser step or another
    # router must be seen.
    f, s = layer("factors")
    f.base.requires_grad_(False)
    router = LinearRouter(D, N, init=torch.randn(N, D))
    f.mixer = router
    x = torch.randn(2, 3, D)
    opt = torch.optim.SGD(router.parameters(), lr=1.0)
    for _ in range(2):
        with torch.no_grad():
            torch.testing.assert_close(f(x), _router_reference(f, s, x, router, "factors"))
        f(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    other = LinearRouter(D, N, init=torch.randn(N, D))
    f.mixer = other
    with torch.no_grad():
        torch.testing.assert_close(f(x), _router_reference(f, s, x, other, "factors"))


@pytest.mark.parametrize("space", ["factors", "deltas"])
@pytest.mark.parametrize("dnn", [False, True])
def test_fixed_coefficients_fold_or_gather(space, dnn, monkeypatch):
    # Global coefficients are folded into one pair of factors, one-hot and 2-sparse rows
    # gather their experts (<= N/2 per row); the base layer's product is the plan's
    # (oneDNN from 64 rows).
    calls_dnn = onednn(monkeypatch, dnn)
    f, s = layer(space)
    f.base.requires_grad_(False)
    x = torch.randn(3, 30 if dnn else 4, D)
    rows = torch.zeros(3, N)
    rows[0, 1], rows[1, 4], rows[2, 0], rows[2, 3] = 1.0, 0.7, 0.4, -0.6
    for c in (rows, torch.softmax(torch.randn(N), -1), torch.eye(N)[2]):
        f.mixer = Fixed(c)
        assert f.inference_plan.kind == "inference-folded"
        expected = loop_reference(
            f.base, s, x, c.expand(3, N)[:, None].expand(3, x.shape[1], N), space
        )
        with torch.inference_mode():
            torch.testing.assert_close(f(x), expected, atol=1e-5, rtol=1e-5)
    assert len(calls_dnn) == (7 if dnn else 0)  # base outputs, and twice the folded factors
    f.mixer = Fixed(torch.softmax(torch.randn(3, N), -1))  # dense rows: the joint GEMM
    assert f.inference_plan.kind == "inference-joint"
    f.mixer = Fixed(rows)
    with pytest.raises(LorafuseError, match="do not fit"), torch.inference_mode():
        f(torch.randn(2, 4, D))  # 2 sequences for 3 rows of coefficients: the reference's error


def test_base_layer_is_a_view_of_the_joint_buffer():
    base = nn.Linear(D, O)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    f = FusedLoRALinear(base, stacked(), "factors", planner=choose)
    f.mixer = Learned(N)
    rows = f.state["rows"].rows  # (O + N*R + N + ALIGN - 1, D)
    assert rows.shape == (O + N * 3 + N + ALIGN - 1, D)
    assert not rows[O + N * 3 + N :].any()  # the padding rows are zeros
    assert base.weight.data_ptr() == rows.data_ptr()  # no second copy of W
    assert base.bias.data_ptr() == f.state["rows"].row_bias.data_ptr()
    assert f.A_rows.data_ptr() == rows[O].data_ptr()  # nor of A
    assert base.weight.is_contiguous() and base.weight.shape == (O, D)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k])
    f.mixer = Fixed(torch.softmax(torch.randn(2, 4, N), -1))
    assert f.state["rows"].rows is rows  # a new mixer keeps the buffer: W is not copied again
    x = torch.randn(2, 4, D)
    f64 = FusedLoRALinear(nn.Linear(D, O), stacked(), "factors", planner=choose)
    f64.mixer = f.mixer
    f64.to(torch.float64)  # the move chooses the plans again, on a float64 buffer
    with torch.inference_mode():
        got = f64(x.double())
        torch.testing.assert_close(got, f64.base(x.double()) + f64.delta(x.double(), f.mixer(x)))
    assert f64.state["rows"].rows.dtype == torch.float64
    assert f64.base.weight.data_ptr() == f64.state["rows"].rows.data_ptr()  # one copy again


def test_the_inference_gemm_takes_aligned_rows_and_reads_only_its_widths():
    # Joint's one GEMM runs over a multiple of ALIGN rows (CPU BLAS is faster there); the
    # columns past the widths are padding, and the output equals the reference.
    base = nn.Linear(D, O)
    f = FusedLoRALinear(base, stacked(), "factors", planner=choose)
    protos = torch.nn.functional.normalize(torch.randn(N, D), dim=-1)
    f.mixer = ArrowRouter(protos, 2, 1.0)  # a projected mixer: its map in the room rows
    plan = f.inference_plan
    assert plan.kind == "inference-joint"
    assert plan.weight.shape[0] % ALIGN == 0 and plan.weight.shape[0] > sum(plan.widths)
    assert sum(plan.widths) == O + N * 3 + N
    x = torch.randn(2, 5, D)
    with torch.inference_mode():
        torch.testing.assert_close(f(x), f.base(x) + f.delta(x, f.mixer(x)))
    room = f.state["rows"].rows[O + N * 3 : O + N * 3 + N]
    torch.testing.assert_close(room, f.mixer.projection)  # synced where the room is


def test_two_fused_layers_on_one_linear():
    # The second layer takes the base weight's rows; the first notices (a pointer check)
    # and chooses its plans again.
    base = nn.Linear(D, O).requires_grad_(False)
    f1 = FusedLoRALinear(base, stacked(0), "factors", planner=choose)
    f2 = FusedLoRALinear(base, stacked(1), "deltas", planner=choose)
    c = torch.softmax(torch.randn(2, 4, N), -1)
    f1.mixer = f2.mixer = Fixed(c)
    x = torch.randn(2, 4, D)
    with torch.inference_mode():
        torch.testing.assert_close(f1(x), loop_reference(base, stacked(0), x, c, "factors"))
        torch.testing.assert_close(f2(x), loop_reference(base, stacked(1), x, c, "deltas"))
    with torch.no_grad():  # the base weight replaced: the plans read the new one
        base.weight = nn.Parameter(torch.randn(O, D), requires_grad=False)
        torch.testing.assert_close(f1(x), loop_reference(base, stacked(0), x, c, "factors"))


def test_small_training_calls_run_the_reference(monkeypatch):
    # Below MIX_WORK the Functions' fixed cost does not pay: autograd through the
    # reference runs (the same numbers); above it, Project and Mix.
    from lorafuse.fast import plans
    from lorafuse.fast.functions import Mix

    monkeypatch.setattr(plans, "MIX_WORK", 20 * D * (O + N * 3))  # 20 rows
    f, s = layer("factors")
    f.base.requires_grad_(False)
    f.mixer = Learned(N)
    calls = []
    monkeypatch.setattr(Mix, "apply", _counting(Mix.apply, calls))
    for T, used in ((3, 0), (10, 1)):  # 2 x 3 = 6 rows, 2 x 10 = 20 rows
        x = torch.randn(2, T, D, requires_grad=True)
        got = torch.autograd.grad(f(x).pow(2).sum(), [x, f.mixer.logits])
        c = f.mixer(x).expand(2, T, N)
        ref = torch.autograd.grad(loop_reference(f.base, s, x, c, "factors").pow(2).sum(),
                                  [x, f.mixer.logits])  # fmt: skip
        for g, e in zip(got, ref):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
        assert len(calls) == used


def test_decoding_joins_the_base_gemm(monkeypatch):
    # A few decoded tokens, like a long input, run ONE GEMM with the base's rows (a
    # separate GEMM for the base costs its own fixed overhead), equal to the reference.
    Nb, Rb, Db, Ob = 32, 4, 128, 256
    s = stacked(0, Nb, Rb, Db, Ob)
    f = FusedLoRALinear(nn.Linear(Db, Ob).requires_grad_(False), s, "factors", planner=choose)
    router = LinearRouter(Db, Nb, init=torch.randn(Nb, Db) / Db**0.5)
    f.mixer = router
    plan = f.inference_plan
    assert isinstance(plan, Joint) and plan.joins
    products = []
    monkeypatch.setattr(plan.ops, "linear", _counting(plan.ops.linear, products))
    monkeypatch.setattr(plan, "base_out", lambda x2: pytest.fail("the base ran apart"))
    for M in (1, 4, 70):
        x = torch.randn(M, 1, Db)
        ref = _router_reference(f, s, x, router, "factors")
        with torch.inference_mode():
            torch.testing.assert_close(f(x), ref, atol=1e-4, rtol=1e-4)
    assert len(products) == 3


def test_the_rule(monkeypatch):
    from transformers.pytorch_utils import Conv1D

    kinds = {
        "fixed-global": (Fixed(torch.ones(N) / N), "train-mix", "inference-folded"),
        "fixed-token": (Fixed(torch.ones(2, 3, N) / N), "train-mix", "inference-joint"),
        "learned": (Learned(N), "train-mix", "inference-joint"),
        "dense router": (LinearRouter(D, N), "train-routed", "inference-joint"),
        "top-k router": (LinearRouter(D, N, top_k=2), "train-mix", "inference-joint"),
        "arrow": (ArrowRouter(torch.randn(N, D), 2), "train-mix", "inference-joint"),
        "hc": (HCRouter(D, torch.tensor([0, 0, 1, 1, 2])), "train-mix", "inference-joint"),
        "function": (lambda x: torch.ones(N) / N, "train-mix", "inference-joint"),
    }
    f, _ = layer("factors")
    f.base.requires_grad_(False)
    for name, (mixer, train, inference) in kinds.items():
        f.mixer = mixer
        assert (f.train_plan.kind, f.inference_plan.kind) == (train, inference), name
        assert describe(f).startswith(f"train {train}, inference {inference} (base joined")
    g = FusedLoRALinear(Conv1D(O, D), stacked(), "factors", planner=choose)
    g.mixer = LinearRouter(D, N)
    assert g.state["rows"].top == 0 and g.train_plan.kind == "train-mix"  # Conv1D: apart
    h = FusedLoRALinear(nn.Linear(D, O), stacked(), "factors")  # no planner
    h.mixer = Learned(N)
    assert h.train_plan is None and h.inference_plan is None
    assert describe(h) == "train reference, inference reference (reference: no planner)"
    monkeypatch.setenv(fast.SWITCH, "0")
    f.replan()
    assert f.train_plan is None and f.inference_plan is None and "LORAFUSE_FAST=0" in f.why


def test_declines_where_the_reference_must_run():
    # A plan serves inputs of the layer's dtype outside autocast; the reference the rest.
    f, s = layer("factors")
    f.mixer = Learned(N)
    calls = []
    f.train_plan = _counting(f.train_plan, calls)
    f.inference_plan = _counting(f.inference_plan, calls)
    x = torch.randn(2, 3, D)
    f(x)
    with torch.no_grad():
        f(x)
    assert len(calls) == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f(x)  # the reference, autocast
    assert y.dtype == torch.bfloat16 and len(calls) == 2


class _Watched(LinearRouter):
    """A LinearRouter that records which of its attributes code outside it reads (its own
    methods, from_projection included, read what they need)."""

    def __getattribute__(self, name):
        reads = object.__getattribute__(self, "__dict__").get("_reads")
        outside = sys._getframe(1).f_code.co_filename != routers.__file__
        if reads is not None and outside and not name.startswith("_"):
            reads.append(name)
        return super().__getattribute__(name)


class _NoEnvironment(dict):
    """os.environ for the length of a forward: any read fails the test."""

    def __getitem__(self, key):
        raise AssertionError(f"a forward read the environment ({key})")

    get = __contains__ = __getitem__


@pytest.mark.parametrize("dense", [True, False])
def test_plans_are_chosen_once(dense, monkeypatch):
    # A forward reads no environment switch, does not choose again and does not check
    # the mixer's kind (SoftmaxRouter's attributes, top_k): all that was decided when the
    # mixer was set.
    f, _ = layer("factors")
    f.base.requires_grad_(False)
    router = _Watched(D, N, init=torch.randn(N, D), top_k=None if dense else 2)
    object.__setattr__(router, "_reads", [])
    f.mixer = router
    x = torch.randn(2, 70, D, requires_grad=True)
    monkeypatch.setattr(fast, "choose", lambda layer: pytest.fail("chosen again in a forward"))
    monkeypatch.setattr(f, "planner", fast.choose)
    router._reads.clear()
    monkeypatch.setattr(os, "environ", _NoEnvironment(os.environ))
    y = f(x)
    with torch.inference_mode():
        f(x)
    monkeypatch.undo()
    y.sum().backward()
    kind_checks = {"softmax_bias", "absolute", "top_k", "num_experts"}
    assert not kind_checks & set(router._reads), router._reads


def test_mixer_kinds_by_protocol():
    router = LinearRouter(D, N)
    arrow = ArrowRouter(torch.randn(N, D), top_k=2)
    assert isinstance(router, SoftmaxRouter) and isinstance(router, ProjectedMixer)
    assert isinstance(arrow, ProjectedMixer) and not isinstance(arrow, SoftmaxRouter)
    assert isinstance(Fixed(torch.ones(N)), Mixer)
    assert not isinstance(Fixed(torch.ones(N)), ProjectedMixer)
    assert isinstance(lambda x: x, Mixer) and not isinstance(lambda x: x, ProjectedMixer)
    f, _ = layer("factors")
    f.base.requires_grad_(False)
    f.mixer = router
    assert f.train_plan.kind == "train-routed"
    router.top_k = 2  # changed in place: not a plain softmax any more
    assert router.softmax_bias is None
    f.replan()  # as set_top_k's callers do: set the mixer again, or replan
    assert f.train_plan.kind == "train-mix"
