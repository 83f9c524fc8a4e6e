"""FusedLoRALinear against hand-written formulas and per-token loops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafuse import kernels
from lorafuse.errors import LorafuseError
from lorafuse.layer import FusedLoRALinear
from lorafuse.layer_grad import Routed
from lorafuse.library import StackedModule
from lorafuse.mixers import Fixed, Learned, Uniform
from lorafuse.mixers.routers import ArrowRouter, LinearRouter
from tests.test_gemm import onednn as onednn_calls
from tests.test_kernels import built

N, R, D, O = 5, 3, 12, 7


def stacked(seed: int = 0) -> StackedModule:
    g = torch.Generator().manual_seed(seed)
    return StackedModule(
        A=torch.randn(N, R, D, generator=g),
        B=torch.randn(N, O, R, generator=g),
        scale=torch.rand(N, generator=g) + 0.5,
        rank=torch.full((N,), R),
    )


def layer(space: str, seed: int = 0) -> tuple[FusedLoRALinear, StackedModule]:
    torch.manual_seed(seed)
    s = stacked(seed)
    return FusedLoRALinear(nn.Linear(D, O), s, space, "test"), s


def loop_reference(base, s: StackedModule, x, c, space):
    """Per-token loop: build the mixed matrices for each token and apply them."""
    Bsz, T, _ = x.shape
    out = torch.empty(Bsz, T, O)
    for b in range(Bsz):
        for t in range(T):
            l = c[b, t]
            if space == "factors":
                A = sum(l[i] * s.A[i] for i in range(N))
                Bm = sum(l[i] * s.scale[i] * s.B[i] for i in range(N))
                d = Bm @ (A @ x[b, t])
            else:
                d = sum(l[i] * s.scale[i] * (s.B[i] @ (s.A[i] @ x[b, t])) for i in range(N))
            out[b, t] = base(x[b, t]) + d
    return out


@pytest.mark.parametrize("space", ["factors", "deltas"])
def test_per_token_equals_loop(space):
    f, s = layer(space)
    x = torch.randn(2, 4, D)
    c = torch.softmax(torch.randn(2, 4, N), -1)
    f.mixer = Fixed(c)
    torch.testing.assert_close(f(x), loop_reference(f.base, s, x, c, space), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("space", ["factors", "deltas"])
def test_inference_path_accumulates_in_place_correctly(space):
    f, s = layer(space)
    f.base.requires_grad_(False)
    x = torch.randn(2, 4, D)
    for c in (torch.softmax(torch.randn(2, 4, N), -1), torch.softmax(torch.randn(N), -1)):
        f.mixer = Fixed(c)
        expected = loop_reference(f.base, s, x, c.expand(2, 4, N), space)
        with torch.inference_mode():
            got = f(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("space", ["factors", "deltas"])
def test_global_and_per_sequence_equal_expanded(space):
    f, s = layer(space)
    x = torch.randn(2, 4, D)
    g = torch.softmax(torch.randn(N), -1)
    f.mixer = Fixed(g)
    expected = loop_reference(f.base, s, x, g.expand(2, 4, N), space)
    torch.testing.assert_close(f(x), expected, atol=1e-5, rtol=1e-5)
    seq = torch.softmax(torch.randn(2, N), -1)
    f.mixer = Fixed(seq)
    expected = loop_reference(f.base, s, x, seq[:, None].expand(2, 4, N), space)
    torch.testing.assert_close(f(x), expected, atol=1e-5, rtol=1e-5)


def test_spaces_differ_but_agree_on_one_hot():
    ff, s = layer("factors")
    fd, _ = layer("deltas")
    x = torch.randn(2, 4, D)
    ff.mixer = fd.mixer = Uniform(N)
    assert (ff(x) - fd(x)).abs().max() > 1e-3  # mixing A and B separately is not linear
    for i in range(N):
        one_hot = torch.nn.functional.one_hot(torch.tensor(i), N).float()
        ff.mixer = fd.mixer = Fixed(one_hot)
        single = ff.base(x) + s.scale[i] * x @ s.A[i].T @ s.B[i].T
        torch.testing.assert_close(ff(x), single, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fd(x), single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("space", ["factors", "deltas"])
def test_gradients_reach_coefficients(space):
    f, _ = layer(space)
    mixer = Learned(N)
    f.mixer = mixer
    f(torch.randn(2, 3, D)).pow(2).sum().backward()
    assert mixer.logits.grad is not None and mixer.logits.grad.abs().sum() > 0


def test_bf16_close_to_fp32():
    f, s = layer("factors")
    x = torch.randn(2, 4, D)
    f.mixer = Fixed(torch.softmax(torch.randn(2, 4, N), -1))
    y32 = f(x)
    fb = FusedLoRALinear(nn.Linear(D, O).to(torch.bfloat16), s, "factors")
    fb.base.load_state_dict({k: v.to(torch.bfloat16) for k, v in f.base.state_dict().items()})
    fb.mixer = f.mixer
    yb = fb(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    assert (yb.float() - y32).abs().max() < 0.1 * y32.abs().max()


def test_bad_coefficients_and_space():
    f, _ = layer("factors")
    f.mixer = Fixed(torch.ones(N + 1))
    with pytest.raises(LorafuseError, match="N=5"):
        f(torch.randn(1, 2, D))
    with pytest.raises(LorafuseError, match="unknown mixing space"):
        FusedLoRALinear(nn.Linear(D, O), stacked(), "weights")
    with pytest.raises(LorafuseError, match="different base model"):
        FusedLoRALinear(nn.Linear(D + 1, O), stacked(), "factors", "m")
    with pytest.raises(LorafuseError, match="NaN"):
        Fixed(torch.tensor([float("nan"), 1.0]))


@pytest.mark.parametrize("space", ["factors", "deltas"])
@pytest.mark.parametrize("onednn", [False, True])
def test_row_sparse_coefficients_equal_the_loop(space, onednn, monkeypatch):
    # One-hot and 2-sparse rows take the gather path (<= N/2 experts per row); without
    # autograd the base layer's product is lorafuse.gemm's (oneDNN from 64 rows).
    dnn = onednn_calls(monkeypatch, onednn)
    f, s = layer(space)
    f.base.requires_grad_(False)
    x = torch.randn(3, 30 if onednn else 4, D)
    c = torch.zeros(3, N)
    c[0, 1], c[1, 4], c[2, 0], c[2, 3] = 1.0, 0.7, 0.4, -0.6
    assert f._row_sparse(c, x)
    expected = loop_reference(f.base, s, x, c[:, None].expand(*x.shape[:2], N), space)
    f.mixer = Fixed(c)
    with torch.inference_mode():
        torch.testing.assert_close(f(x), expected, atol=1e-5, rtol=1e-5)
    assert len(dnn) == (1 if onednn else 0)
    theta = torch.zeros(3, N, requires_grad=True)
    f.mixer = lambda inp: c + theta  # differentiable, still sparse
    f(x).sum().backward()
    assert theta.grad is not None


def _router_reference(f, s, x, router, space):
    """Plain autograd: the base layer plus the per-token loop, coefficients router(x)."""
    return loop_reference(f.base, s, x, router(x), space)


@pytest.mark.parametrize("space", ["factors", "deltas"])
@pytest.mark.parametrize("joined", [True, False])
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("onednn", [False, True])
def test_router_in_the_gemm_values_and_gradients(
    space, joined, absolute, kernel, onednn, monkeypatch
):
    # A router's projection rides in the layer's GEMM (with the base layer, or beside it):
    # the same output and the same gradients for x, the router's weight and its bias.
    # Joined, a softmax router trains through one Function (layer_grad.Routed), with the
    # compiled kernels (lorafuse.kernels) or with torch ops, and its products by oneDNN
    # (lorafuse.gemm; 74 tokens, padded to 80 rows) or by torch.
    monkeypatch.setenv(kernels.SWITCH, "1" if kernel else "0")
    dnn = onednn_calls(monkeypatch, onednn)
    if kernel:
        built()
    used = []
    real = kernels.routed
    monkeypatch.setattr(kernels, "routed", lambda: used.append(real()) or used[-1])
    if not joined:
        monkeypatch.setattr(FusedLoRALinear, "_base_joins", lambda self, x2, P: False)
    f, s = layer(space)
    f.base.requires_grad_(False)
    router = LinearRouter(D, N, init=torch.randn(N, D), absolute=absolute)
    with torch.no_grad():
        router.bias.normal_()
    f.mixer = router
    calls = []
    monkeypatch.setattr(Routed, "apply", _counting(Routed.apply, calls))
    T = 37 if onednn else 4
    x = torch.randn(2, T, D, requires_grad=True)
    w = torch.randn(2, T, O)
    got = f(x)
    grads = torch.autograd.grad((got * w).sum(), [x, router.weight, router.bias])
    # forward: the joint product and the experts' B; backward: their two products
    assert len(dnn) == (4 if onednn else 0)
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


def _counting(fn, calls):
    def counted(*args):
        calls.append(1)
        return fn(*args)

    return counted


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


def test_arrow_router_top_k_in_the_gemm():
    f, s = layer("deltas")
    protos = torch.nn.functional.normalize(torch.randn(N, D), dim=-1)
    f.mixer = router = ArrowRouter(protos, top_k=2, temperature=0.5)
    x = torch.randn(3, 5, D)
    with torch.inference_mode():
        torch.testing.assert_close(f(x), _router_reference(f, s, x, router, "deltas"))


def test_router_changes_reach_the_gemm():
    # The layer keeps a copy of the router's weight in its GEMM: an optimiser step, a
    # device or dtype move or another router must all be seen.
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


def test_base_layer_is_a_view_of_the_fused_weight():
    base = nn.Linear(D, O)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    f = FusedLoRALinear(base, stacked(), "factors")
    assert base.weight.data_ptr() == f.weight_cat.data_ptr()  # no second copy of W
    assert base.bias.data_ptr() == f.bias_cat.data_ptr()
    assert base.weight.is_contiguous() and base.weight.shape == (O, D)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k])
    f.mixer = Fixed(torch.softmax(torch.randn(2, 4, N), -1))
    x = torch.randn(2, 4, D)
    expected = loop_reference(base, stacked(), x, f.mixer(x), "factors")
    f64 = FusedLoRALinear(nn.Linear(D, O), stacked(), "factors").to(torch.float64)
    assert f64.base.weight.data_ptr() == f64.weight_cat.data_ptr()  # still one copy
    assert f64.weight_cat.dtype == torch.float64
    released = f.release()
    assert released is base and type(released) is nn.Linear
    for name, p in released.named_parameters():
        assert p.untyped_storage().nbytes() == p.nbytes, name  # storage of its own
        assert torch.equal(p, before[name])
    with torch.inference_mode():
        torch.testing.assert_close(f(x), expected, atol=1e-5, rtol=1e-5)  # still right


def test_two_fused_layers_on_one_linear():
    # The second layer takes the base weight's view; the first notices and runs apart.
    base = nn.Linear(D, O).requires_grad_(False)
    f1 = FusedLoRALinear(base, stacked(0), "factors")
    f2 = FusedLoRALinear(base, stacked(1), "deltas")
    c = torch.softmax(torch.randn(2, 4, N), -1)
    f1.mixer = f2.mixer = Fixed(c)
    x = torch.randn(2, 4, D)
    with torch.inference_mode():
        torch.testing.assert_close(f1(x), loop_reference(base, stacked(0), x, c, "factors"))
        torch.testing.assert_close(f2(x), loop_reference(base, stacked(1), x, c, "deltas"))


def test_decoding_keeps_small_gemms_apart():
    # With several threads, joining the base GEMM must not make MKL thread a GEMM that
    # would otherwise stay serial (a few decoded tokens); long inputs always join.
    Nb, Rb, Db, Ob = 32, 4, 128, 256
    s = StackedModule(
        A=torch.randn(Nb, Rb, Db), B=torch.randn(Nb, Ob, Rb), scale=torch.ones(Nb),
        rank=torch.full((Nb,), Rb),
    )  # fmt: skip
    f = FusedLoRALinear(nn.Linear(Db, Ob).requires_grad_(False), s, "factors")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert not f._base_joins(torch.randn(4, Db), Nb)
        assert f._base_joins(torch.randn(512, Db), Nb)
        assert f._base_joins(torch.randn(1, Db), Nb)
        torch.set_num_threads(1)
        assert f._base_joins(torch.randn(4, Db), Nb)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("space", ["factors", "deltas"])
def test_conv1d_base(space):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(O, D).requires_grad_(False)  # weight (D, O)
    f = FusedLoRALinear(base, stacked(), space)
    router = LinearRouter(D, N, init=torch.randn(N, D))
    f.mixer = router
    x = torch.randn(2, 3, D, requires_grad=True)
    ref = loop_reference(base, stacked(), x, router(x), space)
    got = f(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    gx, gw = torch.autograd.grad(got.sum(), [x, router.weight])
    ex, ew = torch.autograd.grad(ref.sum(), [x, router.weight])
    torch.testing.assert_close(gx, ex, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw, ew, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("space", ["factors", "deltas"])
@pytest.mark.parametrize("shape", [(N,), (2, N), (2, 4, N)])
def test_gradients_equal_the_loop(space, shape):
    f, s = layer(space)
    f.base.requires_grad_(False)
    theta = torch.randn(*shape, requires_grad=True)
    f.mixer = lambda inp: torch.softmax(theta, -1)  # dense: not the row-sparse path
    x = torch.randn(2, 4, D, requires_grad=True)
    got = f(x)
    c = torch.softmax(theta, -1)
    c = c.expand(2, 4, N) if c.dim() != 2 else c[:, None].expand(2, 4, N)
    ref = loop_reference(f.base, s, x, c, space)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(2, 4, O)
    for g, e in zip(
        torch.autograd.grad((got * w).sum(), [x, theta]),
        torch.autograd.grad((ref * w).sum(), [x, theta]),
    ):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
