"""Hand-edited or broken input files through the CLI: exit 2, one message, no traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from lorafuse.cli import app
from tests.formats.helpers import EXPERTS, write_mttl_expert

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


@pytest.mark.parametrize(
    "name, said",
    [
        ("../escape", "not a plain relative name"),
        ("/tmp/abs", "not a plain relative name"),
        ("a/../../b", "not a plain relative name"),
    ],
)
def test_import_mttl_refuses_names_that_leave_the_output(llama_dir, tmp_path, name, said):
    src, out = tmp_path / "mttl", tmp_path / "out" / "experts"
    src.mkdir()
    for i, expert in enumerate(EXPERTS):
        write_mttl_expert(src, llama_dir, expert, seed=i)
    write_mttl_expert(src, llama_dir, "task_a", seed=5, expert_name=name)
    res = runner.invoke(app, ["import-mttl", str(src), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert said in " ".join(res.output.split()) and "Traceback" not in res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape").exists()


def test_import_mttl_refuses_a_nan_alpha(llama_dir, tmp_path):
    src = tmp_path / "mttl"
    src.mkdir()
    config = {"lora_rank": 4, "lora_alpha": float("nan"), "__model_modifier__": "lora"}
    write_mttl_expert(src, llama_dir, "task_a", seed=1, expert_config=config)
    res = runner.invoke(app, ["import-mttl", str(src), "--out", str(tmp_path / "o")])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "expert_config.lora_alpha" in out and "NaN" in out


@pytest.mark.parametrize(
    "text, said",
    [
        ('{"method": "m", "split": "test", "mean": "x", "se": 0, "per_task": {}}', "'mean'"),
        ("[1]", "top level"),
        ('{"method": ', "not valid JSON"),
    ],
)
def test_table_refuses_a_bad_result_file(tmp_path, text, said):
    (tmp_path / "r.json").write_text(text)
    res = runner.invoke(app, ["table", str(tmp_path / "r.json")])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert "r.json" in out and said in out and "Traceback" not in res.output


def test_refactor_refuses_a_nan_matrix(tmp_path):
    bad = {"experts": ["a"], "tasks": ["t"], "losses": [[float("nan")]], "n_examples": [1]}
    (tmp_path / "m.json").write_text(json.dumps(bad))
    res = runner.invoke(app, ["refactor", str(tmp_path / "m.json"), "--out", str(tmp_path / "o")])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "losses.0.0" in out and "finite" in out
    assert not (tmp_path / "o").exists()
