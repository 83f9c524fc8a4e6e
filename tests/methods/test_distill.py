"""ensemble-distill on the mini benchmark: its lr grid, its teacher, its saved student."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorafuse.errors import LorafuseError
from lorafuse.methods.distill import teacher_weights
from lorafuse.methods.registry import BY_NAME
from lorafuse.methods.run import evaluate_method, fit_method
from lorafuse.spec import load_spec
from lorafuse.workspace import Workspace

QUICK = {"epochs": None, "max_steps": 2, "eval_every": 1, "batch_size": 4}


def test_distill_picks_its_rate_on_validation_from_ensemble_sgd(ws):
    exact = fit_method(ws, "ensemble-exact", "private").payload
    sgd = fit_method(ws, "ensemble-sgd", "private", {**QUICK, "lr_grid": [0.5]}).payload
    assert sgd["weights"] != pytest.approx(exact["weights"], abs=1e-3)  # tells them apart
    # The pico models are random, so no rate is sure to be better; the rule is checked
    # instead: the lowest validation loss wins whatever the grid's order (neither the
    # first nor the last rate by position), and every rate's run is recorded.
    chosen = []
    for grid in ([100.0, 1e-3], [1e-3, 100.0]):
        distill = fit_method(ws, "ensemble-distill", "private", {**QUICK, "lr_grid": grid})
        fit = distill.payload
        assert [r["lr"] for r in fit["runs"]] == grid
        best = min(fit["runs"], key=lambda r: r["validation_loss"])
        assert fit["lr"] == best["lr"] and fit["settings"]["lr"] == best["lr"]
        for key in ("steps", "validation_loss", "final_validation_loss", "stop", "converged"):
            assert fit[key] == best[key]  # the winning run's ending is the fit's
        assert distill.summary["runs"] == fit["runs"]  # every rate's run goes to the study
        chosen.append(fit["lr"])
    losses = {r["lr"]: r["validation_loss"] for r in fit["runs"]}
    assert abs(losses[100.0] - losses[1e-3]) > 1e-4  # the two rates' students differ
    assert chosen[0] == chosen[1]
    assert fit["teacher"] == "ensemble-sgd"  # the paper's teacher, though exact is fitted
    assert fit["teacher_weights"] == pytest.approx(sgd["weights"])
    kept = evaluate_method(ws, "ensemble-distill", "validation")  # the best student is kept
    assert kept.mean == pytest.approx(fit["validation_loss"], abs=1e-5)
    base = AutoModelForCausalLM.from_pretrained(ws.base_id)
    PeftModel.from_pretrained(base, fit["adapter"])  # a standard PEFT adapter
    r = evaluate_method(ws, "ensemble-distill", "test", max_per_task=1)
    assert r.n_tasks == 3 and torch.isfinite(torch.tensor(r.mean))


def test_a_missing_teacher_fit_is_an_error_naming_it_and_the_fix(ws, tmp_path):
    other = Workspace(load_spec(ws.spec.root))
    other.spec = other.spec.model_copy(update={"fits": str(tmp_path / "nofits")})
    with pytest.raises(LorafuseError, match=r"fitted ensemble-sgd .*fit ensemble-sgd first"):
        fit_method(other, "ensemble-distill", "private", QUICK)
    with pytest.raises(LorafuseError, match=r"fitted ensemble-exact .*list ensemble-exact"):
        fit_method(other, "ensemble-distill", "private", {**QUICK, "teacher": "ensemble-exact"})
    uniform = teacher_weights(other, "private", "ensemble-uniform")  # needs no fit
    assert uniform.tolist() == pytest.approx([1 / 3] * 3)


def test_the_teacher_is_a_validated_option_naming_the_fit_it_reads():
    method = BY_NAME["ensemble-distill"]
    with pytest.raises(LorafuseError, match="option 'teacher'"):
        method.parse_options({"teacher": "ensemble-minimax"})
    assert method.needed_fit(method.parse_options({})) == "ensemble-sgd"
    assert method.needed_fit(method.parse_options({"teacher": "ensemble-exact"})) == (
        "ensemble-exact"
    )
    assert method.needed_fit(method.parse_options({"teacher": "ensemble-uniform"})) is None
