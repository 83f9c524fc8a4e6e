"""Hand-edited or broken input files through the CLI: exit 2, one message, no traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from lorafuse.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "change, field",
    [
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"lora_alpha": None}, "lora_alpha"),
        ({"r": "four"}, "'r'"),
        ({"use_rslora": "yes"}, "use_rslora"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern.q_proj"),
    ],
)
def test_info_refuses_a_bad_adapter_config(llama_experts, tmp_path, change, field):
    bad = tmp_path / "bad"
    shutil.copytree(llama_experts[0], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    res = runner.invoke(app, ["info", str(llama_experts[1]), str(bad)])
    out = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "adapter_config.json" in out and field in out and "expected" in out
    assert "Traceback" not in res.output


@pytest.mark.parametrize(
    "config, meta, said",
    [
        ("[1, 2]", None, "top level"),
        ('{"r": 4, "lora_alpha": ', None, "not valid JSON"),
        (None, '["a"]', "lorafuse_expert.json"),
        (None, '{"tasks": [1]}', "tasks.0"),
    ],
)
def test_info_refuses_broken_files(llama_experts, tmp_path, config, meta, said):
    bad = tmp_path / "bad"
    shutil.copytree(llama_experts[0], bad)
    if config is not None:
        (bad / "adapter_config.json").write_text(config)
    if meta is not None:
        (bad / "lorafuse_expert.json").write_text(meta)
    res = runner.invoke(app, ["info", str(bad)])
    assert res.exit_code == 2, res.output
    assert said in " ".join(res.output.split()) and "Traceback" not in res.output
