"""route-hc and route-arrow-hc on the mini benchmark: fit, save, reload, evaluate."""

from __future__ import annotations

import pytest

from lorafuse.errors import LorafuseError
from lorafuse.methods.run import evaluate_method, fit_method


@pytest.mark.parametrize("name", ["route-hc", "route-arrow-hc"])
def test_fit_then_evaluate_reproduces_the_validation_loss(ws, name):
    opts = {"clusters": 2, "epochs": 2, "lr": 0.05, "batch_size": 5}
    fit = fit_method(ws, name, "private", opts).payload
    assert sorted(set(fit["labels"])) == [0, 1] and fit["arrow_init"] == (name != "route-hc")
    assert fit["validation_loss"] <= fit["initial_validation_loss"] + 1e-9
    r = evaluate_method(ws, name, "validation")
    assert r.mean == pytest.approx(fit["validation_loss"], abs=1e-5)


def test_bad_cluster_count(ws):
    with pytest.raises(LorafuseError, match="clusters <= 3"):
        fit_method(ws, "route-hc", "private", {"clusters": 5, "epochs": 1})
