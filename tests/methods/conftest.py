"""The methods' tests share one fixture: a module's own copy of the mini benchmark
(fits are written under its fits/ folder, so modules never see each other's)."""

from __future__ import annotations

import shutil

import pytest

from lorafuse.spec import load_spec
from lorafuse.workspace import Workspace


@pytest.fixture(scope="module")
def ws(mini_bench, tmp_path_factory, request):
    """A Workspace over a copy of `mini_bench` made for the requesting test module."""
    bench = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]) / "bench"
    shutil.copytree(mini_bench, bench)
    return Workspace(load_spec(bench))
