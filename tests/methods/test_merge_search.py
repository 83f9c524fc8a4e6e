"""merge-search on the mini benchmark: its budget, its seed, its objective against plain
PEFT's losses, the L1 penalty, and the evaluated model equal to PEFT with the adapter."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

from lorafuse.errors import LorafuseError
from lorafuse.methods.registry import BY_NAME
from lorafuse.methods.run import evaluate_method, fit_method
from tests.conftest import MINI_TASKS
from tests.evalref import reference_task_losses

pytest.importorskip("cma")

OPTIONS = {"max_passes": 13, "popsize": 4, "sigma": 0.3, "patience": None}
N = 3  # the mini benchmark's private experts


def _peft_mean(ws, split, adapter) -> float:
    ref = reference_task_losses(Path(ws.spec.root), split, Path(adapter))
    return statistics.fmean(ref[t] for t in MINI_TASKS)


def test_row():
    m = BY_NAME["merge-search"]
    assert m.role == "merging" and m.paper == () and m.origin == "LoraHub"
    assert m.cost.folded


def test_budget_objective_and_evaluation_against_peft(ws, tmp_path):
    from lorafuse.merge import merge, save_adapter

    fit = fit_method(ws, "merge-search", "private", OPTIONS).payload
    assert fit["passes"] == 13 == 1 + 4 * fit["generations"]  # whole generations, in budget
    assert fit["stop"] == "pass budget" and fit["converged"] is False
    assert fit["examples_per_pass"] == 15  # 5 training examples of each of the 3 tasks
    w = np.array(fit["global_weights"])
    assert (np.abs(w) <= 1.5).all() and all(v == fit["global_weights"] for v in
                                            fit["weights"].values())  # fmt: skip
    # The start is uniform 1/N; its objective (task-balanced mean NLL over the training
    # examples, + l1 * mean |w|) recomputed with PEFT and merge-uniform's adapter.
    uniform = save_adapter(merge(ws.library("private")), tmp_path / "uniform")
    start = _peft_mean(ws, "train", uniform) + 0.05 / N
    assert fit["start_objective"] == pytest.approx(start, abs=1e-5)
    assert fit["objective"] <= fit["start_objective"]  # never worse than its start
    # the best weights' loss and penalised objective, from PEFT with the saved adapter
    loss = _peft_mean(ws, "train", fit["adapter"])
    assert fit["loss"] == pytest.approx(loss, abs=1e-5)
    assert fit["objective"] == pytest.approx(loss + 0.05 * np.abs(w).mean(), abs=1e-5)
    res = evaluate_method(ws, "merge-search", "validation", "private")
    assert res.mean == pytest.approx(_peft_mean(ws, "validation", fit["adapter"]), abs=1e-5)
    assert res.mean == pytest.approx(fit["validation_loss"], abs=1e-5)


def test_reproducible_per_seed(ws):
    a = fit_method(ws, "merge-search", "private", {**OPTIONS, "seed": 5}).payload
    b = fit_method(ws, "merge-search", "private", {**OPTIONS, "seed": 5}).payload
    c = fit_method(ws, "merge-search", "private", {**OPTIONS, "seed": 6}).payload
    assert a["global_weights"] == b["global_weights"] and a["history"] == b["history"]
    assert c["global_weights"] != a["global_weights"]


def test_l1_pulls_large_weights_toward_zero(ws):
    opts = {**OPTIONS, "max_passes": 41, "sigma": 0.5}
    free = fit_method(ws, "merge-search", "private", {**opts, "l1": 0.0}).payload
    pulled = fit_method(ws, "merge-search", "private", {**opts, "l1": 50.0}).payload
    size = {
        k: float(np.abs(f["global_weights"]).mean())
        for k, f in (("free", free), ("pulled", pulled))
    }
    assert size["pulled"] < 1 / N  # below the start's, which the penalty alone would keep
    assert size["pulled"] < size["free"]


def test_layerwise_searches_one_vector_per_module(ws):
    fit = fit_method(ws, "merge-search", "private", {**OPTIONS, "layerwise": True}).payload
    weights = list(fit["weights"].values())
    assert len(weights) == 4 and all(len(v) == N for v in weights)  # q, v of 2 layers
    assert len({tuple(v) for v in weights}) > 1
    assert fit["search"]["popsize"] == 4 and "global_weights" not in fit
    res = evaluate_method(ws, "merge-search", "validation", "private")
    assert res.mean == pytest.approx(fit["validation_loss"], abs=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_passes": 4, "popsize": 4}, r"max_passes 4 .* at least 5"),
        ({"bound": 0.1}, r"start \[0.33.*outside \[-0.1, 0.1\]"),
        ({"l1": -1.0}, r"option 'l1'.*greater than or equal to 0"),
        ({"lr": 0.1}, r"merge-search has no option 'lr'"),
    ],
)
def test_bad_options_are_named(ws, options, message):
    with pytest.raises(LorafuseError, match=message):
        fit_method(ws, "merge-search", "private", options)


def test_without_cma_it_says_how_to_install(ws, monkeypatch):
    monkeypatch.setitem(sys.modules, "cma", None)
    with pytest.raises(LorafuseError, match=r"pip install 'lorafuse\[search\]'"):
        fit_method(ws, "merge-search", "private", OPTIONS)
