"""Fitted ensembles on the mini benchmark: fit, save, reload, and agree with evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorafuse.errors import LorafuseError
from lorafuse.fit.exact import ensemble_objective
from lorafuse.methods.ensembles import train_cache
from lorafuse.methods.run import evaluate_method, fit_method
from lorafuse.spec import load_spec
from lorafuse.workspace import Workspace


def test_exact_fit_is_optimal_and_matches_evaluation(ws):
    fit = fit_method(ws, "ensemble-exact", "private").payload
    assert fit["converged"] and fit["gap"] <= 1e-8
    weights = torch.tensor(fit["weights"])
    cached = train_cache(ws, "private")
    P, w = cached.logp.double().exp(), cached.token_weights()
    assert fit["objective"] == pytest.approx(ensemble_objective(P, weights, w), abs=1e-9)
    uniform = torch.full((3,), 1 / 3)
    assert fit["objective"] <= ensemble_objective(P, uniform, w) + 1e-12
    # The saved weights evaluated through batched ensemble forwards give the same loss.
    res = evaluate_method(ws, "ensemble-exact", "train")
    assert res.mean == pytest.approx(fit["objective"], abs=1e-5)
    assert res.settings["passes"] == int((weights > 0).sum())


@pytest.mark.parametrize("objective", ["task", "token"])
def test_cached_sgd_loss_is_the_model_forward_loss(ws, objective):
    """ensemble-sgd's loss read from the cache equals the ensemble run through the model,
    for the same examples (the cache orders examples by its batches, so pick by task),
    under either objective: task-balanced mean of per-example means, or token mean."""
    from lorafuse.ensemble import ensemble_logprobs
    from lorafuse.evaluate import target_nll
    from lorafuse.fit.data import TrainingSet
    from lorafuse.methods.ensemble_sgd import CachedEnsembleLoss
    from lorafuse.model import attached

    raw = train_cache(ws, "private", 4)
    cached, data = CachedEnsembleLoss(raw, objective), TrainingSet(ws, "train", 4)
    assert len(cached) == len(data) and sorted(raw.tasks) == sorted(data.tasks)
    theta = torch.tensor([0.4, -0.2, 0.1], requires_grad=True)  # the fit's parameters
    for chosen in (set(data.tasks[:1]), set(data.tasks)):  # one task's examples, then all
        idx = [i for i, t in enumerate(data.tasks) if t in chosen]
        l = theta.softmax(0)
        with attached(ws.model, ws.library("private"), "factors") as fusion:
            t = data.batch(idx)
            s, c = target_nll(ensemble_logprobs(ws.model, fusion, t, l, "probs"), t["labels"])
            by_task = (data.weights[idx] * s / c).mean()
            direct = by_task if objective == "task" else s.sum() / c.sum()
        (g_direct,) = torch.autograd.grad(direct, theta)
        loss = cached(theta.softmax(0), [i for i, t in enumerate(raw.tasks) if t in chosen])
        (g_cached,) = torch.autograd.grad(loss, theta)
        assert loss.item() == pytest.approx(direct.item(), rel=1e-5)
        assert torch.allclose(g_cached, g_direct, rtol=1e-4, atol=1e-6)


def test_sparse_sgd_and_minimax(ws):
    sparse = fit_method(ws, "ensemble-sparse:1", "private").payload
    assert sum(x > 0 for x in sparse["weights"]) == 1
    assert sparse["curve"]["objective"] == sorted(sparse["curve"]["objective"], reverse=True)
    sgd_opts = {"epochs": None, "max_steps": 30, "eval_every": 1, "patience": 2,
                "lr_grid": [0.5, 1e-3], "batch_size": 4}  # fmt: skip
    sgd = fit_method(ws, "ensemble-sgd", "private", sgd_opts).payload
    assert [r["lr"] for r in sgd["runs"]] == [0.5, 1e-3]
    assert sgd["lr"] in (0.5, 1e-3) and abs(sum(sgd["weights"]) - 1) < 1e-6
    (won,) = [r for r in sgd["runs"] if r["lr"] == sgd["lr"]]
    assert won["validation_loss"] == min(r["validation_loss"] for r in sgd["runs"])
    for key in ("steps", "validation_loss", "final_validation_loss", "stop", "converged"):
        assert sgd[key] == won[key]  # the winning run's ending is the fit's
    slow = [r for r in sgd["runs"] if r["lr"] == 1e-3][0]  # tiny steps: flat at once
    # the first validation is the reference, then `patience` ones without improvement
    assert slow["stop"] == "plateau" and slow["converged"] and slow["steps"] == 1 + 2
    mm = fit_method(ws, "ensemble-minimax", "private").payload
    assert 0 < mm["nonzero_fraction"] <= 1
    for name in ("ensemble-sparse:1", "ensemble-sgd", "ensemble-minimax"):
        r = evaluate_method(ws, name, "test", max_per_task=1)
        assert r.n_tasks == 3 and torch.isfinite(torch.tensor(r.mean))


def test_missing_or_stale_fit(ws, tmp_path):
    other = Workspace(load_spec(ws.spec.root))
    other.spec = other.spec.model_copy(update={"fits": str(tmp_path / "nofits")})
    with pytest.raises(LorafuseError, match="has not been fitted.*lorafuse fit"):
        evaluate_method(other, "ensemble-exact", "test")
    fit_method(ws, "ensemble-exact", "private")
    path = Path(ws.fits_dir) / "ensemble-exact__private.json"
    data = json.loads(path.read_text())
    data["experts_order"] = ["a", "b", "c"]
    path.write_text(json.dumps(data))
    with pytest.raises(LorafuseError, match="fit again"):
        evaluate_method(ws, "ensemble-exact", "test")
    with pytest.raises(LorafuseError, match="nothing to fit"):
        fit_method(ws, "oracle", "private")
    with pytest.raises(LorafuseError, match="integer k"):
        fit_method(ws, "ensemble-sparse:x", "private")


def test_cached_scoring_equals_the_ensemble_forward(ws):
    from lorafuse.cache import expert_target_logprobs
    from lorafuse.methods.run import evaluate_cached

    fit_method(ws, "ensemble-sparse:2", "private")
    cached = expert_target_logprobs(ws, "private", "test", 3)
    for name in ("ensemble-uniform", "ensemble-sparse:2"):
        direct = evaluate_method(ws, name, "test", max_per_task=3)
        scored = evaluate_cached(ws, name, cached, "private", "test")
        assert scored.settings["passes"] == direct.settings["passes"]
        for task, v in direct.per_task.items():
            assert scored.per_task[task]["loss"] == pytest.approx(v["loss"], abs=1e-5)
    with pytest.raises(LorafuseError, match="not a probability-level ensemble"):
        evaluate_cached(ws, "merge-uniform", cached, "private", "test")
