"""FusedLoRALinear against hand-written formulas and per-token loops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafuse.errors import LorafuseError
from lorafuse.layer import FusedLoRALinear
from lorafuse.library import StackedModule
from lorafuse.mixers import Fixed, Learned, Uniform

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
def test_row_sparse_coefficients_equal_the_loop(space):
    # One-hot and 2-sparse rows take the gather path (<= N/2 experts per row).
    f, s = layer(space)
    f.base.requires_grad_(False)
    x = torch.randn(3, 4, D)
    c = torch.zeros(3, N)
    c[0, 1], c[1, 4], c[2, 0], c[2, 3] = 1.0, 0.7, 0.4, -0.6
    assert f._row_sparse(c, x)
    expected = loop_reference(f.base, s, x, c[:, None].expand(3, 4, N), space)
    f.mixer = Fixed(c)
    with torch.inference_mode():
        torch.testing.assert_close(f(x), expected, atol=1e-5, rtol=1e-5)
    theta = torch.zeros(3, N, requires_grad=True)
    f.mixer = lambda inp: c + theta  # differentiable, still sparse
    f(x).sum().backward()
    assert theta.grad is not None
