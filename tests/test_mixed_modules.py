"""Experts adapting different modules (issue 17): the library fuses over the union.

Each expert contributes exactly zero on a module it does not adapt, as PEFT does with
that adapter alone; checked against PeftModel (one adapter, and add_weighted_adapter
"cat" for deltas), through the merged PEFT export, and in `lorafuse info`.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from typer.testing import CliRunner

from lorafuse.cli import app
from lorafuse.library import ExpertLibrary
from lorafuse.merge import merge, save_adapter
from lorafuse.model import attach
from tests.conftest import LLAMA_TARGETS, load_base, make_adapter, peft_logits

# Every plain-LoRA layout PEFT saves, each on its own set of modules.
LAYOUTS = {
    "qv": dict(targets=["q_proj", "v_proj"], r=4, lora_alpha=8),
    "all_linear": dict(targets="all-linear", r=2, lora_alpha=4),
    "regex": dict(targets=r".*\.1\.mlp\.(up|down)_proj", r=3, lora_alpha=6),
    "layer0": dict(targets=LLAMA_TARGETS, r=2, lora_alpha=2, layers_to_transform=[0]),
    "exclude": dict(targets="all-linear", r=2, lora_alpha=8, exclude_modules=["o_proj"]),
    "patterns": dict(
        targets=["k_proj", "gate_proj"],
        r=4,
        lora_alpha=8,
        use_rslora=True,
        rank_pattern={"gate_proj": 2},
        alpha_pattern={"k_proj": 3},
    ),
}


@pytest.fixture(scope="module")
def mixed(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    paths = []
    for i, (name, kw) in enumerate(LAYOUTS.items()):
        kw = dict(kw)
        targets = kw.pop("targets")
        paths.append(make_adapter(llama_dir, root / name, 500 + i, targets, **kw))
    return paths


def _peft_modules(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    return {k.removeprefix("base_model.model.").split(".lora_")[0] for k in keys}


def test_library_holds_the_union_and_zero_elsewhere(mixed):
    lib = ExpertLibrary.load(mixed)
    each = [_peft_modules(p) for p in mixed]
    assert set(lib.modules) == set().union(*each)
    assert len({frozenset(s) for s in each}) == len(mixed)  # six different sets
    for i, mods in enumerate(each):
        assert set(lib.covered(i)) == mods
        for m, stacked in lib.modules.items():
            if m not in mods:
                assert int(stacked.rank[i]) == 0
                assert stacked.A[i].abs().sum() == 0 and stacked.B[i].abs().sum() == 0
    assert not any("o_proj" in m for m in lib.covered(4))
    assert all(".layers.0." in m for m in lib.covered(3))


@pytest.mark.parametrize("space", ["factors", "deltas"])
def test_one_hot_equals_peft_with_that_adapter_alone(mixed, llama_dir, tokens, space):
    model = load_base(llama_dir)
    base = model(tokens).logits
    fusion = attach(model, ExpertLibrary.load(mixed), space)
    for i, d in enumerate(mixed):
        fusion.set_expert(i)
        ref = peft_logits(llama_dir, [d], tokens)
        assert (ref - base).abs().max() > 1e-4  # the adapter does something
        assert (model(tokens).logits - ref).abs().max() <= 1e-5, d.name
    fusion.detach()
    assert (model(tokens).logits - base).abs().max() == 0


def test_deltas_equal_peft_cat_over_the_union(mixed, llama_dir, tokens):
    # PEFT's cat needs list-typed target_modules and an adapter on every module of the
    # union by name (it adds the mix to every q_proj if any expert has one)
    listed = [mixed[0], mixed[1], mixed[5]]
    weights = [0.6, -0.4, 0.9]
    model = load_base(llama_dir)
    fusion = attach(model, ExpertLibrary.load(listed), "deltas")
    fusion.set_coefficients(torch.tensor(weights))
    ref = peft_logits(llama_dir, listed, tokens, weights)
    assert (model(tokens).logits - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("space", ["factors", "deltas"])
def test_merged_export_covers_the_union(mixed, llama_dir, tokens, tmp_path, space):
    lib = ExpertLibrary.load(mixed)
    weights = torch.tensor([0.3, 0.1, 0.2, 0.15, 0.15, 0.1])
    out = save_adapter(merge(lib, weights, space), tmp_path / "merged")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == set(lib.modules)
    model = load_base(llama_dir)
    fusion = attach(model, lib, space)
    fusion.set_coefficients(weights)
    ours = model(tokens).logits
    exported = PeftModel.from_pretrained(load_base(llama_dir), out).eval()(tokens).logits
    assert (ours - exported).abs().max() <= 1e-5


def test_info_shows_which_expert_covers_which_modules(mixed):
    res = CliRunner().invoke(app, ["info", *map(str, mixed)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "module coverage (mixed" in res.output
    lines = [ln.replace("┃", "│") for ln in res.output.splitlines()]
    rows = [[c.strip() for c in ln.split("│")[1:-1]] for ln in lines]
    at = next(i for i, r in enumerate(rows) if r and r[0] == "experts")
    header, rows = rows[at], rows[at + 1 :]  # the coverage table's rows
    row = next(r for r in rows if r and r[0] == "all_linear")
    assert row[header.index("o_proj (2)")] == "2"  # both layers' o_proj
    row = next(r for r in rows if r and r[0] == "layer0")
    assert row[header.index("o_proj (2)")] == "1" and row[header.index("up_proj (2)")] == "1"
    row = next(r for r in rows if r and r[0] == "exclude")
    assert row[header.index("o_proj (2)")] == "0"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weight_files(mixed, tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    half = tmp_path / "half"
    shutil.copytree(mixed[1], half)
    sd = {k: v.to(dtype) for k, v in load_file(str(half / "adapter_model.safetensors")).items()}
    save_file(sd, str(half / "adapter_model.safetensors"))
    lib = ExpertLibrary.load([half])
    for key, t in sd.items():
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        stacked = lib.modules[module]
        got = stacked.A[0] if ".lora_A." in key else stacked.B[0]
        assert got.dtype == torch.float32 and torch.equal(got, t.float())


@pytest.fixture(scope="module")
def mixed_bench(mini_bench, tmp_path_factory):
    """The mini benchmark with its private experts on three different module sets."""
    import json as _json

    bench = tmp_path_factory.mktemp("mixed_bench") / "bench"
    shutil.copytree(mini_bench, bench)
    private = bench / "experts" / "private"
    sets = [["q_proj"], ["v_proj", "down_proj"], ["q_proj", "k_proj", "up_proj", "o_proj"]]
    for i, (folder, targets) in enumerate(zip(sorted(private.iterdir()), sets)):
        shutil.rmtree(folder)
        make_adapter(bench / "base", folder, 700 + i, targets, r=2 + i, lora_alpha=8)
        (folder / "lorafuse_expert.json").write_text(_json.dumps({"tasks": [folder.name]}))
    return bench


def test_matrix_and_methods_on_a_mixed_library(mixed_bench, tmp_path):
    from lorafuse.matrix import expert_task_matrix
    from lorafuse.methods.run import evaluate_method
    from lorafuse.spec import load_spec
    from lorafuse.workspace import Workspace
    from tests.evalref import reference_task_losses

    ws = Workspace(load_spec(mixed_bench))
    lib = ws.library("private")
    assert len({tuple(lib.covered(i)) for i in range(len(lib))}) == 3
    m = expert_task_matrix(ws, "private", "validation", rows_per_pass=64)
    refs = {}
    for i, e in enumerate(m.experts):
        refs[e] = reference_task_losses(
            mixed_bench, "validation", mixed_bench / "experts/private" / e
        )
        for j, t in enumerate(m.tasks):
            assert m.losses[i, j].item() == pytest.approx(refs[e][t], abs=1e-5)
    oracle = evaluate_method(ws, "oracle", "validation")
    for task, v in oracle.per_task.items():  # the oracle is each task's own expert, alone
        assert v["loss"] == pytest.approx(refs[task][task], abs=1e-5)
    for name in ("merge-uniform", "merge-uniform-full", "ensemble-uniform", "arrow-top1"):
        r = evaluate_method(ws, name, "validation")
        assert all(torch.isfinite(torch.tensor(v["loss"])) for v in r.per_task.values()), name
