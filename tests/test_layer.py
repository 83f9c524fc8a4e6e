"""FusedLoRALinear against hand-written formulas and per-token loops, with plans and without."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafuse.errors import LorafuseError
from lorafuse.fast import choose
from lorafuse.layer import FusedLoRALinear
from lorafuse.mixers import Fixed, Learned, Uniform
from tests.fast.helpers import D, N, O, layer, loop_reference, stacked

FAST = pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])


@FAST
@pytest.mark.parametrize("space", ["factors", "deltas"])
def test_per_token_equals_loop(space, fast):
    f, s = layer(space, fast=fast)
    x = torch.randn(2, 4, D)
    c = torch.softmax(torch.randn(2, 4, N), -1)
    f.mixer = Fixed(c)
    torch.testing.assert_close(f(x), loop_reference(f.base, s, x, c, space), atol=1e-5, rtol=1e-5)


@FAST
@pytest.mark.parametrize("space", ["factors", "deltas"])
def test_inference_equals_loop(space, fast):
    f, s = layer(space, fast=fast)
    f.base.requires_grad_(False)
    x = torch.randn(2, 4, D)
    for c in (torch.softmax(torch.randn(2, 4, N), -1), torch.softmax(torch.randn(N), -1)):
        f.mixer = Fixed(c)
        expected = loop_reference(f.base, s, x, c.expand(2, 4, N), space)
        with torch.inference_mode():
            got = f(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@FAST
@pytest.mark.parametrize("space", ["factors", "deltas"])
def test_global_and_per_sequence_equal_expanded(space, fast):
    f, s = layer(space, fast=fast)
    x = torch.randn(2, 4, D)
    g = torch.softmax(torch.randn(N), -1)
    f.mixer = Fixed(g)
    expected = loop_reference(f.base, s, x, g.expand(2, 4, N), space)
    torch.testing.assert_close(f(x), expected, atol=1e-5, rtol=1e-5)
    seq = torch.softmax(torch.randn(2, N), -1)
    f.mixer = Fixed(seq)
    expected = loop_reference(f.base, s, x, seq[:, None].expand(2, 4, N), space)
    torch.testing.assert_close(f(x), expected, atol=1e-5, rtol=1e-5)


@FAST
def test_spaces_differ_but_agree_on_one_hot(fast):
    ff, s = layer("factors", fast=fast)
    fd, _ = layer("deltas", fast=fast)
    x = torch.randn(2, 4, D)
    ff.mixer = fd.mixer = Uniform(N)
    assert (ff(x) - fd(x)).abs().max() > 1e-3  # mixing A and B separately is not linear
    for i in range(N):
        one_hot = torch.nn.functional.one_hot(torch.tensor(i), N).float()
        ff.mixer = fd.mixer = Fixed(one_hot)
        single = ff.base(x) + s.scale[i] * x @ s.A[i].T @ s.B[i].T
        torch.testing.assert_close(ff(x), single, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fd(x), single, atol=1e-5, rtol=1e-5)


@FAST
@pytest.mark.parametrize("space", ["factors", "deltas"])
def test_delta_is_the_experts_part(space, fast):
    f, s = layer(space, fast=fast)
    x = torch.randn(2, 4, D)
    c = torch.softmax(torch.randn(2, 4, N), -1)
    expected = loop_reference(f.base, s, x, c, space) - f.base(x)
    torch.testing.assert_close(f.delta(x, c), expected, atol=1e-5, rtol=1e-5)


@FAST
@pytest.mark.parametrize("space", ["factors", "deltas"])
def test_gradients_reach_coefficients(space, fast):
    f, _ = layer(space, fast=fast)
    mixer = Learned(N)
    f.mixer = mixer
    f(torch.randn(2, 3, D)).pow(2).sum().backward()
    assert mixer.logits.grad is not None and mixer.logits.grad.abs().sum() > 0


@FAST
@pytest.mark.parametrize("space", ["factors", "deltas"])
@pytest.mark.parametrize("shape", [(N,), (2, N), (2, 4, N)])
def test_gradients_equal_the_loop(space, shape, fast):
    f, s = layer(space, fast=fast)
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


@FAST
def test_bf16_close_to_fp32(fast):
    f, s = layer("factors", fast=fast)
    x = torch.randn(2, 4, D)
    f.mixer = Fixed(torch.softmax(torch.randn(2, 4, N), -1))
    y32 = f(x)
    base = nn.Linear(D, O).to(torch.bfloat16)
    base.load_state_dict({k: v.to(torch.bfloat16) for k, v in f.base.state_dict().items()})
    fb = FusedLoRALinear(base, s, "factors", planner=choose if fast else None)
    fb.mixer = f.mixer
    yb = fb(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    assert (yb.float() - y32).abs().max() < 0.1 * y32.abs().max()


@FAST
def test_bad_coefficients_and_space(fast):
    f, _ = layer("factors", fast=fast)
    f.mixer = Fixed(torch.ones(N + 1))
    with pytest.raises(LorafuseError, match="N=5"):
        f(torch.randn(1, 2, D))
    with pytest.raises(LorafuseError, match="unknown mixing space"):
        FusedLoRALinear(nn.Linear(D, O), stacked(), "weights")
    with pytest.raises(LorafuseError, match="different base model"):
        FusedLoRALinear(nn.Linear(D + 1, O), stacked(), "factors", "m")
    with pytest.raises(LorafuseError, match="NaN"):
        Fixed(torch.tensor([float("nan"), 1.0]))


@FAST
def test_release_gives_the_base_layer_back_unchanged(fast):
    base = nn.Linear(D, O)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    f = FusedLoRALinear(base, stacked(), "factors", planner=choose if fast else None)
    f.mixer = Fixed(torch.softmax(torch.randn(2, 4, N), -1))
    x = torch.randn(2, 4, D)
    expected = loop_reference(base, stacked(), x, f.mixer(x), "factors")
    with torch.inference_mode():
        f(x)
    released = f.release()
    assert released is base and type(released) is nn.Linear
    for name, p in released.named_parameters():
        assert p.untyped_storage().nbytes() == p.nbytes, name  # storage of its own
        assert torch.equal(p, before[name])
    with torch.inference_mode():
        torch.testing.assert_close(f(x), expected, atol=1e-5, rtol=1e-5)  # still right


def test_mixer_may_be_a_module_a_function_or_none():
    f, _ = layer("factors")
    x = torch.randn(2, 3, D)
    f.mixer = Uniform(N)
    assert "mixer" in dict(f.named_children())
    f.mixer = lambda inp: torch.full((N,), 1.0 / N)
    assert "mixer" not in dict(f.named_children())
    torch.testing.assert_close(f(x), f.base(x) + f.delta(x, torch.full((N,), 1.0 / N)))
    f.mixer = None
    torch.testing.assert_close(f(x), f.base(x))
