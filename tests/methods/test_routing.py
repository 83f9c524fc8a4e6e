"""Routing methods on the mini benchmark: route-sgd (fit, save, top-k), Arrow, the B.4
gap, and route-sgd under `accelerate launch` with two processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorafuse.errors import LorafuseError
from lorafuse.methods.routing import topk_gap
from lorafuse.methods.run import evaluate_method, fit_method
from lorafuse.routed import load_routed
from lorafuse.spec import load_spec
from lorafuse.workspace import Workspace
from tests.conftest import load_base
from tests.methods.route_sgd_script import run

ROOT = Path(__file__).resolve().parents[2]


def test_route_sgd_fits_saves_and_evaluates_top_k(ws):
    fit = fit_method(ws, "route-sgd", "private", {"epochs": 3, "lr": 0.1, "batch_size": 5}).payload
    assert fit["validation_loss"] < fit["initial_validation_loss"]
    assert fit["router_parameters"] == 4 * (32 * 3 + 3)  # 4 fused layers, W (N, D) and b
    dense = evaluate_method(ws, "route-sgd", "validation")
    assert dense.mean == pytest.approx(fit["validation_loss"], abs=1e-5)
    top4 = evaluate_method(ws, "route-sgd-top4", "validation")  # k clamped to N = 3
    assert top4.settings["top_k"] == 3 and top4.mean == pytest.approx(dense.mean, abs=1e-5)
    top1 = evaluate_method(ws, "route-sgd-top1", "validation")
    assert top1.settings["top_k"] == 1 and top1.mean != pytest.approx(dense.mean, abs=1e-6)
    gap = topk_gap(top1, dense)
    assert gap["gap"] == pytest.approx(top1.mean - dense.mean) and gap["n_tasks"] == 3
    model = load_base(Path(ws.base_id))
    fusion = load_routed(model, fit["routed"])  # the fit's routed model, in one call
    assert len(fusion.layers) == 4


def test_route_sgd_arrow_init_starts_at_dense_arrow(ws):
    fit = fit_method(ws, "route-sgd-arrow", "private", {"max_steps": 1, "lr": 1e-3}).payload
    arrow = evaluate_method(ws, "arrow", "validation")
    assert fit["initial_validation_loss"] == pytest.approx(arrow.mean, abs=1e-5)
    evaluate_method(ws, "route-sgd-arrow-top2", "test", max_per_task=1)


def test_arrow_methods(ws):
    dense = evaluate_method(ws, "arrow", "validation")
    assert dense.settings["space"] == "factors" and dense.settings["temperature"] == 1.0
    top4 = evaluate_method(ws, "arrow-top4", "validation")
    assert top4.mean == pytest.approx(dense.mean, abs=1e-6)  # k = N: all experts
    top1 = evaluate_method(ws, "arrow-top1", "validation")
    assert top1.mean != pytest.approx(dense.mean, abs=1e-6)
    same = evaluate_method(ws, "arrow-with:k=all,temperature=1", "validation")
    assert same.mean == pytest.approx(dense.mean, abs=1e-7)
    deltas = evaluate_method(ws, "arrow-with:space=deltas,k=2,temperature=0.5", "validation")
    assert deltas.settings["space"] == "deltas" and deltas.settings["top_k"] == 2
    assert deltas.mean != pytest.approx(dense.mean, abs=1e-6)
    for bad in ("arrow-with:k=two", "arrow-with:space=weights", "arrow-with:temp=1"):
        with pytest.raises(LorafuseError):
            evaluate_method(ws, bad, "validation")
    with pytest.raises(LorafuseError, match="temperature must be > 0"):
        evaluate_method(ws, "arrow-with:temperature=0", "validation")
    with pytest.raises(LorafuseError, match="route-sgd-arrow.*lorafuse fit"):
        evaluate_method(ws, "route-sgd-arrow-top1", "test", kind="shared")


def test_accelerate_two_processes_equal_one(ws, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate launcher not installed")
    bench = Path(ws.spec.root)
    one = run(bench, tmp_path / "ckpt1")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(ROOT / "tests/methods/route_sgd_script.py"), str(bench), str(tmp_path / "two.pt")]
    out = subprocess.run(cmd + [str(tmp_path / "ckpt2")], env=env, cwd=ROOT, capture_output=True)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    two = torch.load(tmp_path / "two.pt")
    assert int(two.pop("processes")) == 2  # two real processes ran
    assert set(two) == set(one) and any(v.abs().max() > 0 for v in one.values())
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, atol=1e-5, rtol=0)


def test_fitting_a_top_k_variant_names_its_fit(mini_bench):
    from lorafuse.errors import LorafuseError
    from lorafuse.methods.run import fit_method

    ws = Workspace(load_spec(mini_bench))
    with pytest.raises(LorafuseError, match="fit route-sgd instead"):
        fit_method(ws, "route-sgd-top1", "private")
