"""The compiled routed-layer kernels against the same formulas written with torch autograd."""

from __future__ import annotations

import subprocess

import pytest
import torch

from lorafuse.fast import kernels
from tests.fast.helpers import built

R, N, O = 3, 13, 7  # odd sizes: every vector loop also runs its remainder
M = 37  # tokens; 1000 runs the loops in parallel (from 32768 = M R N elements)


def reference(out, b, gz, space, absolute, M=M):
    """l, h, z and the gradients of (z * gz).sum() for u, p and b, by torch autograd."""
    u = out[:, O : O + R * N].detach().clone().requires_grad_()
    p = out[:, O + R * N :].detach().clone().requires_grad_()
    b = b.clone().requires_grad_()
    l = torch.softmax((p.abs() if absolute else p) + b, -1)  # (M, N)
    u3 = u.view(M, R, N)
    h = torch.einsum("mrn,mn->mr", u3, l)  # (M, R)
    z = (h[:, :, None] if space == "factors" else u3) * l[:, None, :]  # (M, R, N)
    gu, gp, gb = torch.autograd.grad((z * gz.view(M, R, N)).sum(), [u, p, b])
    return l, h, z.reshape(M, R * N), gu, gp, gb


@pytest.mark.parametrize("space", ["factors", "deltas"])
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("scale", [1.0, 60.0])  # 60: scores far apart, exp underflows to 0
@pytest.mark.parametrize("M", [M, 1000])
def test_kernels_equal_autograd(space, absolute, scale, M):
    check(built(), space, absolute, scale, M)


def check(kern, space, absolute, scale, M):
    """The kernels' forward and backward against `reference` on random rows."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(M, O + R * N + N + 5, generator=g)[:, :-5]  # rows strided, as a view
    out[:, O + R * N :] *= scale
    b = torch.randn(N, generator=g)
    gz, gout = torch.randn(M, R * N, generator=g), torch.randn(M, O, generator=g)
    widths = (O, R * N, N)
    l, h, z = kernels.forward(kern, out, b, widths, space, absolute)
    el, eh, ez, egu, egp, egb = reference(out, b, gz, space, absolute, M)
    torch.testing.assert_close(l, el, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(z, ez, atol=1e-6, rtol=1e-5)
    if space == "factors":
        torch.testing.assert_close(h, eh, atol=1e-6, rtol=1e-5)
    # inference's z alone (no l or h kept): the same arithmetic, the same bits
    z_alone = kernels.mixed(kern, out, b, widths, space == "factors", absolute)
    torch.testing.assert_close(z_alone, z, atol=0, rtol=0)
    G = torch.full((M, O + R * N + N), float("nan"))
    gbias = kernels.backward(kern, gout, gz, out, l, h, G, widths, space, absolute)
    torch.testing.assert_close(G[:, :O], gout, atol=0, rtol=0)
    torch.testing.assert_close(G[:, O : O + R * N], egu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(G[:, O + R * N :], egp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gbias, egb, atol=1e-4, rtol=1e-5)


def test_results_do_not_depend_on_the_thread_count():
    kern = built()
    g = torch.Generator().manual_seed(1)
    M = 1000
    out = torch.randn(M, O + R * N + N, generator=g)
    b, gz, gout = torch.randn(N, generator=g), torch.randn(M, R * N), torch.randn(M, O)
    widths = (O, R * N, N)
    runs, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            l, h, z = kernels.forward(kern, out, b, widths, "factors", False)
            G = torch.empty(M, O + R * N + N)
            gbias = kernels.backward(kern, gout, gz, out, l, h, G, widths, "factors", False)
            runs.append((l, z, G, gbias))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, e in zip(other, runs[0]):
            assert torch.equal(a, e)


def test_build_is_cached_and_leaves_no_partial_file(tmp_path, monkeypatch):
    built()
    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_loaded", {})
    compiles = []
    real = subprocess.run

    def run(cmd, *a, **kw):
        compiles.extend([cmd] if "-c" in cmd else [])
        return real(cmd, *a, **kw)

    monkeypatch.setattr(subprocess, "run", run)
    first = kernels.routed()
    assert first is not None and len(compiles) == 1
    assert [f.name for f in (tmp_path / "kernels").iterdir()] == [first.path.name]
    monkeypatch.setattr(kernels, "_loaded", {})  # a new process: loads, does not compile
    assert kernels.routed().path == first.path and len(compiles) == 1


def test_without_a_compiler_the_torch_ops_run(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(kernels, "_loaded", {})
    with pytest.warns(RuntimeWarning, match="routed.c were not built"):
        assert kernels.routed() is None
    assert kernels.routed() is None  # decided once per process
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())


def test_a_failing_build_leaves_nothing(tmp_path, monkeypatch):
    cc = tmp_path / "cc"
    cc.write_text('#!/bin/sh\n[ "$1" = --version ] && exit 0\necho broken >&2\nexit 1\n')
    cc.chmod(0o755)
    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setattr(kernels, "_loaded", {})
    with pytest.warns(RuntimeWarning, match="broken"):
        assert kernels.routed() is None
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []


def test_without_openmp_they_build_serial(tmp_path, monkeypatch):
    built()
    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "_openmp_runtime", lambda: str(tmp_path / "libgomp.so.1"))
    kern = kernels.routed()  # linking to the missing runtime fails: a serial build
    assert kern is not None and kern.openmp is None
    check(kern, "factors", True, 1.0, 1000)


def test_switch_turns_them_off(monkeypatch):
    # Read when a plan is chosen: for_plan, never the kernels' own calls.
    monkeypatch.setenv(kernels.SWITCH, "0")
    assert kernels.for_plan(torch.device("cpu"), torch.float32) is None
    monkeypatch.setenv(kernels.SWITCH, "1")
    assert kernels.for_plan(torch.device("cpu"), torch.bfloat16) is None  # float32 only
