"""SGD-learned merging on the mini benchmark: fit, export, and agree with plain PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorafuse.errors import LorafuseError
from lorafuse.methods.run import evaluate_method, fit_method
from tests.conftest import MINI_TASKS
from tests.evalref import reference_task_losses

OPTIONS = {"epochs": 2, "lr": 0.1, "batch_size": 5}


def _same_as_peft(ws, result, adapter):
    ref = reference_task_losses(Path(ws.spec.root), result.split, Path(adapter))
    for t in MINI_TASKS:
        assert result.per_task[t]["loss"] == pytest.approx(ref[t], abs=1e-5)


def test_global_merge(ws):
    fit = fit_method(ws, "merge-sgd-global", "private", OPTIONS).payload
    g = torch.tensor(fit["global_weights"])
    assert g.sum() == pytest.approx(1, abs=1e-6) and (g > 0).all()
    assert not torch.allclose(g, torch.full((3,), 1 / 3), atol=1e-3)  # it moved
    assert all(w == fit["global_weights"] for w in fit["weights"].values())
    assert len(fit["weights"]) == 4  # q_proj and v_proj of 2 layers
    assert fit["validation_loss"] <= fit["initial_validation_loss"]
    assert not (Path(ws.fits_dir) / ".ckpt").exists()  # checkpoints cleaned up
    res = evaluate_method(ws, "merge-sgd-global", "validation")
    assert res.mean == pytest.approx(fit["validation_loss"], abs=1e-5)
    _same_as_peft(ws, res, fit["adapter"])  # the exported adapter is the evaluated model


def test_layer_merge_with_a_grid(ws):
    fit = fit_method(ws, "merge-sgd-layer", "private", {**OPTIONS, "lr_grid": [0.1, 1e-3]}).payload
    assert [r["lr"] for r in fit["runs"]] == [0.1, 1e-3]
    best = min(fit["runs"], key=lambda r: r["validation_loss"])
    assert fit["lr"] == best["lr"] and fit["validation_loss"] == best["validation_loss"]
    # The fit's convergence is that of the winning rate's run.
    assert (fit["converged"], fit["stop"], fit["steps"]) == (
        best["converged"], best["stop"], best["steps"],
    )  # fmt: skip
    weights = [torch.tensor(w) for w in fit["weights"].values()]
    assert len(weights) == 4 and not all(torch.allclose(weights[0], w) for w in weights[1:])
    res = evaluate_method(ws, "merge-sgd-layer", "validation")
    _same_as_peft(ws, res, fit["adapter"])


def test_fit_until_a_plateau_records_how_it_ended(ws):
    opts = {"epochs": None, "max_steps": 40, "eval_every": 1, "patience": 2, "lr": 0.1,
            "batch_size": 5, "min_delta": 0.01}  # fmt: skip
    fit = fit_method(ws, "merge-sgd-global", "private", opts).payload
    (run,) = fit["runs"]
    vals = [h["validation"] for h in run["history"]]
    assert fit["steps"] == len(vals) <= 40  # one validation per step
    assert fit["stop"] in ("plateau", "step cap")
    assert fit["converged"] is (fit["stop"] == "plateau") is (fit["steps"] < 40)
    assert fit["validation_loss"] == min(vals) and fit["final_validation_loss"] == vals[-1]
    assert fit["best_step"] == vals.index(min(vals)) + 1
    # The weights kept are those of the best step: evaluating them gives its loss.
    res = evaluate_method(ws, "merge-sgd-global", "validation")
    assert res.mean == pytest.approx(fit["validation_loss"], abs=1e-5)
    with pytest.raises(LorafuseError, match="needs max_steps"):
        fit_method(ws, "merge-sgd-global", "private", {**opts, "max_steps": None})


def test_stale_fit(ws):
    fit_method(ws, "merge-sgd-global", "private", {**OPTIONS, "max_steps": 1})
    path = Path(ws.fits_dir) / "merge-sgd-global__private.json"
    data = json.loads(path.read_text())
    data["experts_order"] = ["a", "b", "c"]
    path.write_text(json.dumps(data))
    with pytest.raises(LorafuseError, match="fit again"):
        evaluate_method(ws, "merge-sgd-global", "test")
    with pytest.raises(LorafuseError, match="has not been fitted"):
        evaluate_method(ws, "merge-sgd-layer", "test", kind="shared")
