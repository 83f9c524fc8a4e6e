"""Mode connectivity: the path's endpoints are the two experts, evaluated alone."""

from __future__ import annotations

import pytest

from lorafuse.errors import LorafuseError
from lorafuse.methods.run import evaluate_method
from lorafuse.select.connectivity import connectivity
from lorafuse.spec import load_spec
from lorafuse.workspace import Workspace


def test_endpoints_equal_the_experts(mini_bench):
    ws = Workspace(load_spec(mini_bench))
    c = connectivity(ws, "private", ["count", "upper"], [0.25, 0.5], "test", rows_per_pass=4)
    assert c["alphas"] == [0.0, 0.25, 0.5, 1.0] and c["tasks"] == ["count", "upper"]
    for alpha_index, expert in ((0, "count"), (-1, "upper")):
        r = evaluate_method(ws, f"single:{expert}", "test")
        expected = (r.per_task["count"]["loss"] + r.per_task["upper"]["loss"]) / 2
        assert c["loss"][alpha_index] == pytest.approx(expected, abs=1e-5)
    assert c["oracle"] <= min(c["loss"][0], c["loss"][-1]) + 1e-9


def test_bad_pairs(mini_bench):
    ws = Workspace(load_spec(mini_bench))
    with pytest.raises(LorafuseError, match="unknown expert"):
        connectivity(ws, "private", ["count", "nobody"], [0.5])
    with pytest.raises(LorafuseError, match="two different experts"):
        connectivity(ws, "private", ["count", "count"], [0.5])
    with pytest.raises(LorafuseError, match=r"\[0, 1\]"):
        connectivity(ws, "private", ["count", "upper"], [1.5])
