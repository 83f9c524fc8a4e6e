"""`lorafuse info` and `lorafuse merge` through the CLI, and lazy imports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from typer.testing import CliRunner

from lorafuse.cli import app
from lorafuse.library import ExpertLibrary
from lorafuse.model import attach
from tests.conftest import load_base

runner = CliRunner()


@pytest.mark.parametrize(
    "argv, shown",
    [
        ([], "merge"),
        (["study"], "--seeds"),
        (["compare"], "--out"),
        (["import-mttl"], "--ignore-meta"),
    ],
)
def test_help_does_not_import_torch(argv, shown):
    args = ["lorafuse", *argv, "--help"]
    code = f"import sys; from lorafuse.cli import main; sys.argv={args!r}\n"
    code += "try:\n    main()\nexcept SystemExit:\n    pass\n"
    code += "assert 'torch' not in sys.modules, 'torch imported by --help'\nprint('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert shown in out.stdout and out.stdout.strip().endswith("ok")


def test_info_plan(llama_dir, llama_experts):
    # The plans each fused layer gets, with the rule's reasons, as lorafuse.fast chose them.
    res = runner.invoke(app, ["info", *map(str, llama_experts), "--base", str(llama_dir), "--plan"])
    out = " ".join(res.output.split())
    assert res.exit_code == 0, res.output
    assert "merge (uniform)" in out and "inference-folded" in out
    assert "dense router" in out and "train-routed" in out and "dense softmax router" in out
    assert "top-2 Arrow router" in out and "train-mix" in out
    res = runner.invoke(app, ["info", *map(str, llama_experts), "--plan"])
    assert res.exit_code == 2 and "--plan needs --base" in res.output


def test_info_table(llama_experts):
    res = runner.invoke(app, ["info", *map(str, llama_experts)])
    assert res.exit_code == 0, res.output
    for name in ("e0", "e1", "e2", "e3"):
        assert name in res.output
    assert "q_proj" in res.output and "4 experts" in res.output


def test_merge_writes_peft_adapter(llama_dir, llama_experts, tmp_path, tokens):
    out = tmp_path / "merged"
    args = ["merge", *map(str, llama_experts), "--out", str(out), "--weights", "0.4,0.1,0.3,0.2"]
    res = runner.invoke(app, [*args, "--space", "deltas", "--rank", "3"])
    assert res.exit_code == 0, res.output
    assert "energy kept" in res.output
    meta = json.loads((out / "lorafuse_expert.json").read_text())
    assert meta["space"] == "deltas" and meta["rank"] == 3
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    PeftModel.from_pretrained(load_base(llama_dir), out)


def test_merge_full_model(llama_dir, llama_experts, tmp_path, tokens):
    out, full = tmp_path / "m", tmp_path / "full"
    args = ["merge", *map(str, llama_experts), "--out", str(out)]
    res = runner.invoke(app, [*args, "--base", str(llama_dir), "--model-out", str(full)])
    assert res.exit_code == 0, res.output
    from transformers import AutoModelForCausalLM

    model = load_base(llama_dir)
    attach(model, ExpertLibrary.load(llama_experts), "factors")  # uniform by default
    merged = AutoModelForCausalLM.from_pretrained(full).eval()
    assert (merged(tokens).logits - model(tokens).logits).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--space", "weights"], "unknown mixing space 'weights'"),
        (["--weights", "0.5,x"], "comma-separated numbers"),
        (["--weights", "0.5,0.5"], "4 numbers"),
    ],
)
def test_merge_bad_options(llama_experts, tmp_path, extra, message):
    out = tmp_path / "never"
    res = runner.invoke(app, ["merge", *map(str, llama_experts), "--out", str(out), *extra])
    assert res.exit_code != 0
    assert message in " ".join(res.output.split())
    assert not out.exists()
    assert not any(p.name.startswith(".never") for p in tmp_path.iterdir())


def test_merge_bad_expert_and_existing_output(llama_dir, llama_experts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama_experts[0], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", str(llama_experts[1]), str(bad), "--out", str(out)])
    assert res.exit_code == 2 and "expert bad" in res.output and "DoRA" in res.output
    assert not out.exists()
    out.mkdir()
    res = runner.invoke(app, ["merge", *map(str, llama_experts), "--out", str(out)])
    assert res.exit_code == 2 and "--force" in res.output
    assert list(out.iterdir()) == []
    res = runner.invoke(app, ["merge", *map(str, llama_experts), "--out", str(out), "--force"])
    assert res.exit_code == 0 and (out / "adapter_model.safetensors").exists()
    assert torch.isfinite(torch.tensor(1.0))


@pytest.mark.parametrize(
    "method, extra",
    [
        ("ties", ["--density", "0.5"]),
        ("dare-ties", ["--drop", "0.3", "--seed", "7"]),
        ("task-arithmetic", ["--normalize", "--weights", "1,2,1,1"]),
        ("magnitude-prune", []),
        ("breadcrumbs", ["--density", "0.8", "--gamma", "0.05", "--rank", "3"]),
        ("peft-linear", []),
    ],
)
def test_merge_methods_through_the_cli(llama_experts, tmp_path, method, extra):
    from safetensors.torch import load_file

    from lorafuse.delta_merge import delta_merge

    out = tmp_path / "m"
    res = runner.invoke(
        app, ["merge", *map(str, llama_experts), "--out", str(out), "--method", method, *extra]
    )
    assert res.exit_code == 0, res.output
    assert f"by {method}" in res.output
    options = {}
    for flag, key, cast in (
        ("--density", "density", float),
        ("--drop", "drop", float),
        ("--gamma", "gamma", float),
    ):
        if flag in extra:
            options[key] = cast(extra[extra.index(flag) + 1])
    if "--normalize" in extra:
        options["normalize"] = True
    if method.startswith("dare"):
        options["seed"] = 7
    weights = [1.0, 2.0, 1.0, 1.0] if "--weights" in extra else None
    if method in ("ties", "dare-ties") and weights is None:
        weights = [1.0] * len(llama_experts)  # the CLI's default for disjoint means
    rank = 3 if "--rank" in extra else None
    api = delta_merge(ExpertLibrary.load(llama_experts), method, weights, rank, **options)
    saved = load_file(str(out / "adapter_model.safetensors"))
    for name, (A, B) in api.modules.items():
        a = saved[f"base_model.model.{name}.lora_A.weight"]
        b = saved[f"base_model.model.{name}.lora_B.weight"]
        torch.testing.assert_close(b @ a, B @ A, atol=1e-5, rtol=1e-4)
    meta = json.loads((out / "lorafuse_expert.json").read_text())
    assert meta["merge_method"] == method


@pytest.mark.parametrize(
    "extra, said",
    [
        (["--method", "soup"], "unknown --method 'soup'"),
        (["--method", "ties", "--density", "0"], "0.0 is not a fraction in (0, 1]"),
        (["--method", "ties", "--density", "1.5"], "1.5"),
        (["--method", "dare-linear", "--drop", "1"], "1.0 is not a probability"),
        (["--method", "ties", "--drop", "0.5"], "takes no option ['drop']"),
        (["--density", "0.5"], "--method linear takes no --density"),
        (["--method", "ties", "--space", "deltas"], "--space is linear's"),
        (["--method", "ties", "--weights", "nan,1,1,1"], "nan"),
        (["--method", "ties", "--weights", "1,1"], "4 numbers"),
    ],
)
def test_merge_method_bad_options(llama_experts, tmp_path, extra, said):
    out = tmp_path / "never"
    res = runner.invoke(app, ["merge", *map(str, llama_experts), "--out", str(out), *extra])
    assert res.exit_code == 2 and said in " ".join(res.output.split()), res.output
    assert not out.exists() and "Traceback" not in res.output
