"""The delta merges as study methods on the mini benchmark: the hyper-parameter chosen on
validation, and the evaluated model equal to plain PEFT with the saved adapter."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafuse.errors import LorafuseError
from lorafuse.methods.registry import BY_NAME
from lorafuse.methods.run import evaluate_method, fit_method
from tests.conftest import MINI_TASKS
from tests.evalref import reference_task_losses

NAMES = ("merge-task-arithmetic", "merge-ties", "merge-dare-linear", "merge-dare-ties",
         "merge-magnitude-prune", "merge-breadcrumbs")  # fmt: skip
GRIDS = {
    "merge-task-arithmetic": {"scale_grid": [0.5, 3.0]},
    "merge-ties": {"density_grid": [0.1, 0.5, 1.0]},
    "merge-dare-linear": {"drop_grid": [0.0, 0.9]},
    "merge-dare-ties": {"drop_grid": [0.2, 0.9]},
    "merge-magnitude-prune": {"density_grid": [0.05, 1.0]},
    "merge-breadcrumbs": {"density_grid": [0.3, 0.9], "gamma": 0.05},
}


def _peft_mean(ws, split, adapter) -> float:
    ref = reference_task_losses(Path(ws.spec.root), split, Path(adapter))
    return statistics.fmean(ref[t] for t in MINI_TASKS)


def test_rows_are_merges_beyond_the_paper():
    for name in (*NAMES, "merge-ties-rank"):
        m = BY_NAME[name]
        assert m.role == "merging" and m.paper == () and m.origin == "PEFT / mergekit"
        assert m.cost.folded and m.cost.experts == 0
    assert BY_NAME["merge-ties-rank"].fitted_by == "merge-ties"


def test_ties_density_is_the_grid_value_with_the_lowest_peft_validation_loss(ws, tmp_path):
    """Each grid value's merge (w_i = 1, PEFT's ties defaults) scored by plain PEFT on the
    whole validation split, independently: the fit picks the argmin, with those losses."""
    from lorafuse.delta_merge import ties
    from lorafuse.merge import save_adapter

    grid = GRIDS["merge-ties"]["density_grid"]
    opts = {"density_grid": grid, "validation_max_per_task": None}
    fit = fit_method(ws, "merge-ties", "private", opts).payload
    lib = ws.library("private")
    ref = []
    for d in grid:
        adapter = save_adapter(ties(lib, [1.0, 1.0, 1.0], density=d), tmp_path / f"ties-{d}")
        ref.append(_peft_mean(ws, "validation", adapter))
    assert [r["density"] for r in fit["runs"]] == grid
    for run, loss in zip(fit["runs"], ref):
        assert run["validation_loss"] == pytest.approx(loss, abs=1e-5)
    assert fit["density"] == grid[int(np.argmin(ref))]
    assert fit["validation_loss"] == pytest.approx(min(ref), abs=1e-5)
    assert fit["weights"] == [1.0, 1.0, 1.0] and fit["param"] == "density"
    # the evaluation attaches the saved adapter: the same loss as PEFT loading it
    res = evaluate_method(ws, "merge-ties", "test", "private")
    ref_test = reference_task_losses(Path(ws.spec.root), "test", Path(fit["adapter"]))
    for t in MINI_TASKS:
        assert res.per_task[t]["loss"] == pytest.approx(ref_test[t], abs=1e-5)
    assert res.settings["density"] == fit["density"] and res.settings["rank"] == fit["rank"]


@pytest.mark.parametrize("name", NAMES)
def test_every_merge_picks_its_best_value_and_evaluates_its_adapter(ws, name):
    fit = fit_method(ws, name, "private", GRIDS[name]).payload
    param = fit["param"]
    losses = [r["validation_loss"] for r in fit["runs"]]
    assert fit[param] == fit["runs"][int(np.argmin(losses))][param]
    n = 3
    expected = [1.0] * n if "ties" in name else [1 / n] * n
    if name == "merge-task-arithmetic":
        expected = [fit["scale"] / n] * n
    assert fit["weights"] == pytest.approx(expected)
    res = evaluate_method(ws, name, "validation", "private")
    assert res.mean == pytest.approx(_peft_mean(ws, "validation", fit["adapter"]), abs=1e-5)


def test_dare_follows_its_seed(ws):
    opts = {"drop_grid": [0.5]}
    a = fit_method(ws, "merge-dare-ties", "private", {**opts, "seed": 1}).payload
    b = fit_method(ws, "merge-dare-ties", "private", {**opts, "seed": 1}).payload
    c = fit_method(ws, "merge-dare-ties", "private", {**opts, "seed": 2}).payload
    assert a["validation_loss"] == b["validation_loss"] != c["validation_loss"]


def test_rank_variant_truncates_the_fit_and_reports_the_energy_kept(ws, tmp_path):
    """merge-ties-rank:2 equals PEFT with the saved adapter truncated to rank 2 by a
    numpy SVD of each module's B @ A; the energy is that SVD's (worst and mean)."""
    from safetensors.torch import load_file, save_file

    fit = fit_method(ws, "merge-ties", "private", {"density_grid": [0.5]}).payload
    res = evaluate_method(ws, "merge-ties-rank:2", "validation", "private")
    folder = Path(fit["adapter"])
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out, kept = {}, []
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        A = tensors[key].double().numpy()
        B = tensors[key.replace("lora_A", "lora_B")].double().numpy()
        U, S, Vh = np.linalg.svd(B @ A)
        kept.append((S[:2] ** 2).sum() / (S**2).sum())
        out[key] = torch.tensor(np.diag(S[:2]) @ Vh[:2]).float()  # (2, D)
        out[key.replace("lora_A", "lora_B")] = torch.tensor(U[:, :2]).float()  # (O, 2)
    assert fit["rank"] > 2 and res.settings["exact_rank"] == fit["rank"]
    assert res.settings["rank"] == 2
    assert res.settings["energy_min"] == pytest.approx(min(kept), abs=1e-5)
    assert res.settings["energy_mean"] == pytest.approx(statistics.fmean(kept), abs=1e-5)
    low = tmp_path / "rank2"
    low.mkdir()
    save_file(out, str(low / "adapter_model.safetensors"))
    config = (folder / "adapter_config.json").read_text()
    r = fit["rank"]
    config = config.replace(f'"r": {r}', '"r": 2').replace(f'"lora_alpha": {r}', '"lora_alpha": 2')
    (low / "adapter_config.json").write_text(config)
    assert '"r": 2' in config and '"lora_alpha": 2' in config
    assert res.mean == pytest.approx(_peft_mean(ws, "validation", low), abs=1e-5)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("merge-ties", {"density_grid": [0.2, 0.0]}, r"density_grid.1.*greater than 0"),
        ("merge-magnitude-prune", {"density_grid": [1.5]}, r"density_grid.0.*less than or"),
        ("merge-dare-ties", {"drop_grid": [1.0]}, r"drop_grid.0.*less than 1"),
        ("merge-ties", {"density_grid": []}, r"density_grid.*at least 1"),
        ("merge-task-arithmetic", {"scale_grid": [float("nan")]}, r"scale_grid.0.*finite"),
        ("merge-breadcrumbs", {"density_grid": [0.99], "gamma": 0.05}, r"density 0.99 .* 0.05"),
        ("merge-ties", {"drop_grid": [0.5]}, r"merge-ties has no option 'drop_grid'"),
    ],
)
def test_bad_options_are_named(ws, name, options, message):
    with pytest.raises(LorafuseError, match=message):
        fit_method(ws, name, "private", options)


def test_bad_rank_argument_is_named(ws):
    fit_method(ws, "merge-ties", "private", {"density_grid": [0.5]})
    with pytest.raises(LorafuseError, match=r"positive integer .* got 'x'"):
        evaluate_method(ws, "merge-ties-rank:x", "validation", "private")
    with pytest.raises(LorafuseError, match="fit merge-ties instead"):
        fit_method(ws, "merge-ties-rank:2", "private")
