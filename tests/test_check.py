"""`lorafuse info --check`: every reason an expert would be refused, from headers only."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lorafuse.check import check_experts
from lorafuse.cli import app
from lorafuse.library import ExpertLibrary

runner = CliRunner()
ST = "adapter_model.safetensors"


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Any read of a tensor's values fails: the check must use headers only."""
    import lorafuse.library as library

    def refuse(self, key):
        raise AssertionError(f"tensor {key} read")

    monkeypatch.setattr(library._SafetensorsHandle, "get_tensor", refuse)


def edit_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def test_a_good_library_checks_ok(llama_experts, llama_dir, no_tensor_reads):
    checks = check_experts(llama_experts, base=llama_dir)
    assert all(c.ok for c in checks) and [c.name for c in checks] == ["e0", "e1", "e2", "e3"]
    assert checks[3].ranks == [2, 3] and checks[2].scalings == [2.0]  # rsLoRA: 4 / sqrt(4)
    assert len(checks[0].modules) == 14
    res = runner.invoke(
        app, ["info", "--check", *map(str, llama_experts), "--base", str(llama_dir)]
    )
    assert res.exit_code == 0 and "can be fused" in res.output, res.output


def test_every_problem_is_listed(llama_experts, gpt2_dir, tmp_path, no_tensor_reads):
    folders = []
    for name in ("dora", "wide", "other_base", "wrong_rank", "fine"):
        folders.append(tmp_path / name)
        shutil.copytree(llama_experts[0], folders[-1])
    edit_config(folders[0], use_dora=True)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    sd = load_file(str(folders[1] / ST))
    sd[key] = torch.zeros(4, 40)
    save_file(sd, str(folders[1] / ST))
    edit_config(folders[2], base_model_name_or_path="someone/else")
    edit_config(folders[3], r=8)
    checks = {c.name: c for c in check_experts(folders)}
    assert "DoRA" in " ".join(checks["dora"].problems)
    assert "in=40" in " ".join(checks["wide"].problems)
    assert "someone/else" in " ".join(checks["other_base"].problems)
    assert "rank 8" in " ".join(checks["wrong_rank"].problems)
    assert checks["fine"].ok
    res = runner.invoke(app, ["info", "--check", *map(str, folders)], env={"COLUMNS": "300"})
    assert res.exit_code == 2 and "4 of 5 experts cannot be fused" in " ".join(res.output.split())
    argv = ["info", "--check", str(folders[4]), "--base", str(gpt2_dir)]
    res = runner.invoke(app, argv, env={"COLUMNS": "400"})
    assert res.exit_code == 2 and "14 of its 14 modules are not Linear/Conv1D" in res.output


def test_check_agrees_with_loading(llama_experts, tmp_path):
    # whatever check calls fine loads, and what it refuses does not
    bad = tmp_path / "bad"
    shutil.copytree(llama_experts[1], bad)
    edit_config(bad, lora_bias=True)
    for experts, ok in ((llama_experts, True), ([llama_experts[0], bad], False)):
        assert all(c.ok for c in check_experts(experts)) is ok
        if ok:
            ExpertLibrary.load(experts)
        else:
            with pytest.raises(Exception, match="lora_bias"):
                ExpertLibrary.load(experts)


def test_base_needs_check_and_must_be_readable(llama_experts, tmp_path):
    res = runner.invoke(app, ["info", str(llama_experts[0]), "--base", "x"])
    assert res.exit_code == 2 and "--base goes with --check" in res.output
    res = runner.invoke(app, ["info", "--check", str(llama_experts[0]), "--base", str(tmp_path)])
    assert res.exit_code == 2 and "config.json" in res.output and "Traceback" not in res.output
