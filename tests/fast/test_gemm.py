"""lorafuse.fast.gemm's products against torch's own (F.linear, addmm), oneDNN on and off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafuse.fast import gemm
from tests.fast.helpers import onednn


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("M", [5, 64, 74, 300])
def test_products_equal_torch(monkeypatch, on, M):
    calls = onednn(monkeypatch, on)
    ops = gemm.products()  # reads LORAFUSE_ONEDNN now, as a plan does
    assert ops.onednn == on
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 40, generator=g)[:, 3:33]  # (M, 30), rows strided: a column slice
    w = torch.randn(30, 17, generator=g).T  # (17, 30), a transposed view
    b = torch.randn(17, generator=g)
    y = torch.randn(M, 17, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ops.linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            ops.addmm(y, x, w.T), torch.addmm(y, x, w.T), atol=1e-5, rtol=1e-5
        )
        acc = y.clone()
        assert ops.addmm_(acc, x, w.T) is acc
        torch.testing.assert_close(acc, torch.addmm(y, x, w.T), atol=1e-5, rtol=1e-5)
    used = on and M >= gemm.MIN_ROWS
    assert calls == ([(gemm.bucket(M), 30)] * 3 if used else [])


def test_autograd_keeps_torch_products(monkeypatch):
    calls = onednn(monkeypatch, True)
    x = torch.randn(100, 8, requires_grad=True)
    w = torch.randn(6, 8)
    gemm.products().linear(x, w).sum().backward()  # grad mode: torch's op, which autograd knows
    torch.testing.assert_close(x.grad, w.sum(0).expand(100, 8))
    assert calls == []


def test_buckets_are_few_and_tight():
    sizes = range(gemm.MIN_ROWS, 8192)
    buckets = {gemm.bucket(M) for M in sizes}
    assert all(M <= gemm.bucket(M) <= M * 9 / 8 for M in sizes)
    assert len(buckets) <= 8 * 7 + 1  # 8 per power of two from 64 to 8192
    assert gemm.bucket(5) == 5 and gemm.bucket(64) == 64 and gemm.bucket(435) == 448


@pytest.mark.parametrize("on", [True, False])
def test_any_strides(monkeypatch, on):
    onednn(monkeypatch, on)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(17, 60, generator=g)[:, ::2]  # (17, 30), every other column
    for x in (
        torch.randn(1, 30, generator=g).expand(100, 30),  # stride 0: a broadcast gradient
        torch.randn(30, 100, generator=g).T,  # column-major
        torch.randn(96, 60, generator=g)[:, ::2],  # every other column
    ):
        with torch.no_grad():
            torch.testing.assert_close(
                gemm.products().linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5
            )


@pytest.mark.parametrize("onednn_s, torch_s, chosen", [(1.0, 2.0, True), (1.0, 1.05, False)])
def test_auto_picks_the_faster_product_by_measuring(
    tmp_path, monkeypatch, onednn_s, torch_s, chosen
):
    # "auto" times both once per machine and keeps the answer: a second process (here,
    # a cleared memory) reads it back without timing again.
    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path))
    monkeypatch.setenv(gemm.SWITCH, "auto")
    monkeypatch.setattr(gemm, "_state", {})
    monkeypatch.setattr(gemm, "measure", lambda: (onednn_s, torch_s))
    if not gemm._works(warn=False):
        pytest.skip("oneDNN's linear is not usable in this torch build")
    assert gemm.enabled() is chosen and gemm.products().onednn is chosen
    (kept,) = (tmp_path / "kernels").glob("onednn-*.json")
    monkeypatch.setattr(gemm, "_state", {})
    monkeypatch.setattr(gemm, "measure", lambda: pytest.fail("measured twice"))
    assert gemm.enabled() is chosen
    assert kept.read_text().count('"onednn": ' + ("true" if chosen else "false")) == 1


def test_measure_times_both_products():
    onednn_s, torch_s = gemm.measure(rounds=1)
    assert onednn_s > 0 and torch_s > 0


def test_a_launched_process_never_times(tmp_path, monkeypatch):
    # Ranks timing at once could choose apart; a launched process takes the fixed rule.
    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(gemm, "measure", lambda: pytest.fail("a launched process timed"))
    monkeypatch.setattr(gemm, "_amd_avx512", lambda: True)
    assert gemm._faster() is True
    monkeypatch.setattr(gemm, "_amd_avx512", lambda: False)
    assert gemm._faster() is False
    assert not list(tmp_path.rglob("onednn-*.json"))  # nothing kept from a rule
