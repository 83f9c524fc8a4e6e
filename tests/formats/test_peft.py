"""adapter_config.json and lorafuse_expert.json: typed fields, refused with file and field."""

from __future__ import annotations

import json

import pytest

from lorafuse.errors import ExpertError
from lorafuse.formats.peft import read_config, read_metadata

GOOD = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "v_proj"],
    "use_dora": False,
    "modules_to_save": None,
    "rank_pattern": {"v_proj": 2},
    "alpha_pattern": {},
    "base_model_name_or_path": None,
    "lora_dropout": 0.0,
    "some_future_peft_key": {"anything": [1, 2]},
}


def expert(tmp_path, config=None, text: str | None = None, meta: str | None = None):
    d = tmp_path / "ex"
    d.mkdir(exist_ok=True)
    cfg = text if text is not None else json.dumps(config if config is not None else GOOD)
    (d / "adapter_config.json").write_text(cfg)
    if meta is not None:
        (d / "lorafuse_expert.json").write_text(meta)
    return d


def test_good_config_reads_with_patterns(tmp_path):
    cfg = read_config(expert(tmp_path))
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (4, 8.0, False)
    assert cfg.rank_alpha("model.layers.0.self_attn.v_proj") == (2, 8.0)
    assert cfg.scaling("model.layers.0.self_attn.q_proj") == 2.0
    assert cfg.raw["some_future_peft_key"] == {"anything": [1, 2]}
    assert read_config(expert(tmp_path, {"r": 2, "lora_alpha": 1.5, "target_modules": "q"}))


@pytest.mark.parametrize(
    "change, said",
    [
        ({"lora_alpha": float("nan")}, "'lora_alpha': expected a finite number, got NaN"),
        ({"lora_alpha": float("inf")}, "'lora_alpha': expected a finite number, got Infinity"),
        ({"lora_alpha": None}, "'lora_alpha': expected a number, got null"),
        ({"lora_alpha": "16"}, "'lora_alpha': expected a number, got \"16\""),
        ({"r": "four"}, "'r': expected an integer, got \"four\""),
        ({"r": 0}, "'r': expected a number > 0, got 0"),
        ({"r": 4.5}, "'r': expected an integer, got 4.5"),
        ({"r": None}, "'r': expected an integer, got null"),
        ({"use_rslora": "true"}, "'use_rslora': expected true or false"),
        ({"fan_in_fan_out": 1}, "'fan_in_fan_out': expected true or false, got 1"),
        ({"rank_pattern": {"v_proj": -2}}, "'rank_pattern.v_proj': expected a number > 0"),
        ({"rank_pattern": [2]}, "'rank_pattern': expected an object"),
        ({"alpha_pattern": {"q": float("nan")}}, "'alpha_pattern.q': expected a finite"),
        ({"alpha_pattern": {"q[": 2.0}}, "'alpha_pattern': key 'q[' is not a regular"),
        ({"target_modules": 3}, "'target_modules': expected a list of strings, a string"),
        ({"target_modules": ["q", 3]}, "'target_modules': expected a list of strings"),
        ({"base_model_name_or_path": 7}, "'base_model_name_or_path': expected a string"),
        ({"use_dora": "no"}, "'use_dora': expected true or false"),
        ({"peft_type": 3}, "'peft_type': expected a string, got 3"),
    ],
)
def test_bad_values_are_refused_by_field(tmp_path, change, said):
    d = expert(tmp_path, {**GOOD, **change})
    with pytest.raises(ExpertError) as info:
        read_config(d)
    message = str(info.value)
    assert "expert ex" in message and "adapter_config.json" in message and said in message


@pytest.mark.parametrize(
    "text, said",
    [
        ("[1, 2]", "expected an object at the top level, got a list [1, 2]"),
        ("null", "expected an object at the top level, got null"),
        ('{"r": 4, "lora_alpha": 8', "not valid JSON (empty or truncated?)"),
        ("", "not valid JSON (empty or truncated?)"),
        ('{"lora_alpha": 8}', "field 'r': missing (expected an integer)"),
    ],
)
def test_bad_files_are_refused(tmp_path, text, said):
    with pytest.raises(ExpertError, match="adapter_config.json") as info:
        read_config(expert(tmp_path, text=text))
    assert said in str(info.value)


def test_refusals_come_before_type_checks(tmp_path):
    with pytest.raises(ExpertError, match="peft_type is LOHA; only LoRA"):
        read_config(expert(tmp_path, {"peft_type": "LOHA", "r": "x"}))
    with pytest.raises(ExpertError, match="DoRA"):
        read_config(expert(tmp_path, {**GOOD, "use_dora": True, "lora_alpha": None}))
    with pytest.raises(ExpertError, match="lora_bias=true"):
        read_config(expert(tmp_path, {**GOOD, "lora_bias": True}))
    with pytest.raises(ExpertError, match="modules_to_save"):
        read_config(expert(tmp_path, {**GOOD, "modules_to_save": ["lm_head"]}))


def test_metadata_good_missing_and_bad(tmp_path):
    assert read_metadata(expert(tmp_path)) == {}
    meta = '{"tasks": ["a", "b"], "kind": "private", "weights": [0.5, NaN]}'
    assert read_metadata(expert(tmp_path, meta=meta))["tasks"] == ["a", "b"]
    for text, said in [
        ('["a"]', "expected an object at the top level, got a list"),
        ('{"tasks": "a,b"}', "field 'tasks': expected a list, got \"a,b\""),
        ('{"tasks": ["a", null]}', "field 'tasks.1': expected a string, got null"),
        ('{"tasks": ["a"', "not valid JSON"),
    ]:
        with pytest.raises(ExpertError, match="lorafuse_expert.json") as info:
            read_metadata(expert(tmp_path, meta=text))
        assert "expert ex" in str(info.value) and said in str(info.value)
