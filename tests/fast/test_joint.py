"""The joint path's own machinery: which speed-ups run, the shared buffer, the rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafuse import fast
from lorafuse.fast import kernels, sparse
from lorafuse.fast.functions import Routed
from lorafuse.fast.joint import JointPath
from lorafuse.layer import FusedLoRALinear
from lorafuse.mixers import Fixed, Learned
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
@pytest.mark.parametrize("joined", [True, False])
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("dnn", [False, True])
def test_router_in_the_gemm_values_and_gradients(space, joined, absolute, kernel, dnn, monkeypatch):
    # A router's projection rides in the layer's GEMM (with the base layer, or beside it):
    # the same output and the same gradients for x, the router's weight and its bias.
    # Joined, a softmax router trains through one Function (Routed), with the compiled
    # kernels or with torch ops, and its products by oneDNN (74 tokens, padded to 80
    # rows) or by torch.
    monkeypatch.setenv(kernels.SWITCH, "1" if kernel else "0")
    calls_dnn = onednn(monkeypatch, dnn)
    if kernel:
        built()
    used = []
    real = kernels.routed
    monkeypatch.setattr(kernels, "routed", lambda: used.append(real()) or used[-1])
    if not joined:
        monkeypatch.setattr(JointPath, "_base_joins", lambda self, *args: False)
    f, s = layer(space)
    f.base.requires_grad_(False)
    router = LinearRouter(D, N, init=torch.randn(N, D), absolute=absolute)
    with torch.no_grad():
        router.bias.normal_()
    f.mixer = router
    calls = []
    monkeypatch.setattr(Routed, "apply", _counting(Routed.apply, calls))
    T = 37 if dnn else 4
    x = torch.randn(2, T, D, requires_grad=True)
    w = torch.randn(2, T, O)
    got = f(x)
    grads = torch.autograd.grad((got * w).sum(), [x, router.weight, router.bias])
    # forward: the joint product and the experts' B; backward: their two products
    assert len(calls_dnn) == (4 if dnn else 0)
    ref = _router_reference(f, s, x, router, space)
    expected = torch.autograd.grad((ref * w).sum(), [x, router.weight, router.bias])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    assert len(calls) == (1 if joined else 0)
    assert [k is not None for k in used] == ([kernel] if joined else [])
    with torch.inference_mode():  # inference uses the kernels, joined or not
        torch.testing.assert_close(f(x), ref, atol=1e-5, rtol=1e-5)
    assert [k is not None for k in used[-1:]] == [kernel]


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
def test_row_sparse_coefficients_equal_the_loop(space, dnn, monkeypatch):
    # One-hot and 2-sparse rows take the gather path (<= N/2 experts per row); without
    # autograd the base layer's product is fast.gemm's (oneDNN from 64 rows).
    calls_dnn = onednn(monkeypatch, dnn)
    f, s = layer(space)
    f.base.requires_grad_(False)
    x = torch.randn(3, 30 if dnn else 4, D)
    c = torch.zeros(3, N)
    c[0, 1], c[1, 4], c[2, 0], c[2, 3] = 1.0, 0.7, 0.4, -0.6
    assert sparse.applies(c, x, N)
    expected = loop_reference(f.base, s, x, c[:, None].expand(*x.shape[:2], N), space)
    f.mixer = Fixed(c)
    with torch.inference_mode():
        torch.testing.assert_close(f(x), expected, atol=1e-5, rtol=1e-5)
    assert len(calls_dnn) == (1 if dnn else 0)
    theta = torch.zeros(3, N, requires_grad=True)
    f.mixer = lambda inp: c + theta  # differentiable, still sparse
    f(x).sum().backward()
    assert theta.grad is not None


def test_base_layer_is_a_view_of_the_joint_buffer():
    base = nn.Linear(D, O)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    f = FusedLoRALinear(base, stacked(), "factors")
    rows = f.fast.rows  # (O + N*R + N, D)
    assert rows.shape == (O + N * 3 + N, D)
    assert base.weight.data_ptr() == rows.data_ptr()  # no second copy of W
    assert base.bias.data_ptr() == f.fast.row_bias.data_ptr()
    assert f.A_rows.data_ptr() == rows[O].data_ptr()  # nor of A
    assert base.weight.is_contiguous() and base.weight.shape == (O, D)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k])
    f.mixer = Fixed(torch.softmax(torch.randn(2, 4, N), -1))
    x = torch.randn(2, 4, D)
    f64 = FusedLoRALinear(nn.Linear(D, O), stacked(), "factors").to(torch.float64)
    assert f64.fast.rows is None  # dropped by the move, rebuilt from the base at the next call
    f64.mixer = f.mixer
    with torch.inference_mode():
        got = f64(x.double())
        torch.testing.assert_close(got, f64.base(x.double()) + f64.delta(x.double(), f.mixer(x)))
    assert f64.fast.rows.dtype == torch.float64
    assert f64.base.weight.data_ptr() == f64.fast.rows.data_ptr()  # one copy again
    assert f64.fast.rows.is_inference() is False


def test_two_fused_layers_on_one_linear():
    # The second layer takes the base weight's rows; the first notices and runs apart.
    base = nn.Linear(D, O).requires_grad_(False)
    f1 = FusedLoRALinear(base, stacked(0), "factors")
    f2 = FusedLoRALinear(base, stacked(1), "deltas")
    c = torch.softmax(torch.randn(2, 4, N), -1)
    f1.mixer = f2.mixer = Fixed(c)
    x = torch.randn(2, 4, D)
    assert not f1.fast._joined(base.weight, base.bias)
    assert f2.fast._joined(base.weight, base.bias)
    with torch.inference_mode():
        torch.testing.assert_close(f1(x), loop_reference(base, stacked(0), x, c, "factors"))
        torch.testing.assert_close(f2(x), loop_reference(base, stacked(1), x, c, "deltas"))


def test_decoding_keeps_small_gemms_apart():
    # With several threads, joining the base GEMM must not make MKL thread a GEMM that
    # would otherwise stay serial (a few decoded tokens); long inputs always join.
    Nb, Rb, Db, Ob = 32, 4, 128, 256
    s = stacked(0, Nb, Rb, Db, Ob)
    f = FusedLoRALinear(nn.Linear(Db, Ob).requires_grad_(False), s, "factors")
    w, b = f.base.weight, f.base.bias
    joins = lambda layer, x2, P: f.fast._base_joins(layer, w, b, x2, P)  # noqa: E731
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert not joins(f, torch.randn(4, Db), Nb)
        assert joins(f, torch.randn(512, Db), Nb)
        assert joins(f, torch.randn(1, Db), Nb)
        torch.set_num_threads(1)
        assert joins(f, torch.randn(4, Db), Nb)
    finally:
        torch.set_num_threads(threads)


def test_the_rule(monkeypatch):
    from transformers.pytorch_utils import Conv1D

    f, _ = layer("factors")
    assert isinstance(f.fast, JointPath) and f.fast.top == O  # nn.Linear: W joins
    g = FusedLoRALinear(Conv1D(O, D), stacked(), "factors")
    assert isinstance(g.fast, JointPath) and g.fast.top == 0  # Conv1D: apart
    assert FusedLoRALinear(nn.Linear(D, O), stacked(), "factors", fast=False).fast is None
    monkeypatch.setenv(fast.SWITCH, "0")
    assert FusedLoRALinear(nn.Linear(D, O), stacked(), "factors").fast is None


def test_declines_where_the_reference_must_run():
    f, s = layer("factors")
    f.mixer = Learned(N)
    x = torch.randn(2, 3, D)
    assert f.fast(f, x, f.mixer) is not None
    assert f.fast(f, x.double(), f.mixer) is None  # another dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert f.fast(f, x, f.mixer) is None
        y = f(x)  # the reference, autocast
    assert y.dtype == torch.bfloat16


def test_mixer_kinds_by_protocol():
    router = LinearRouter(D, N)
    arrow = ArrowRouter(torch.randn(N, D), top_k=2)
    assert isinstance(router, SoftmaxRouter) and isinstance(router, ProjectedMixer)
    assert isinstance(arrow, ProjectedMixer) and not isinstance(arrow, SoftmaxRouter)
    assert isinstance(Fixed(torch.ones(N)), Mixer)
    assert not isinstance(Fixed(torch.ones(N)), ProjectedMixer)
    assert isinstance(lambda x: x, Mixer) and not isinstance(lambda x: x, ProjectedMixer)
    f, _ = layer("factors")
    assert f.fast._kinds(router) == (True, True)
    assert f.fast._kinds(arrow) == (True, False)
    router.top_k = 2
    assert router.softmax_bias is None  # top-k: not a plain softmax, no Routed Function
