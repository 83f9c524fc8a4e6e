"""What is not plain LoRA is refused before anything is written, naming the expert and
the field (issue 17): adapters saved by PEFT itself where PEFT can make them."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lorafuse.cli import app
from lorafuse.errors import ExpertError
from lorafuse.library import ExpertLibrary
from tests.conftest import load_base, make_adapter


def peft_saved(base_dir, out, config):
    from peft import get_peft_model

    get_peft_model(load_base(base_dir), config).save_pretrained(out)
    return out


def edited(src, out, **changes):
    import shutil

    shutil.copytree(src, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


CASES = {
    "dora": ("DoRA", lambda b, o, e: make_adapter(b, o, 1, ["q_proj"], r=2, use_dora=True)),
    "bias": ("lora_bias", lambda b, o, e: make_adapter(b, o, 1, ["q_proj"], r=2, lora_bias=True)),
    "save": (
        "modules_to_save",
        lambda b, o, e: make_adapter(b, o, 1, ["q_proj"], r=2, modules_to_save=["lm_head"]),
    ),
    "embed": ("adapts an embedding", lambda b, o, e: make_adapter(b, o, 1, ["embed_tokens"], r=2)),
    "tokens": (
        "trainable_token_indices",
        lambda b, o, e: make_adapter(b, o, 1, ["q_proj"], r=2, trainable_token_indices=[3, 5]),
    ),
    "params": (
        "target_parameters",
        lambda b, o, e: edited(e, o, target_parameters=["mlp.experts.gate_up_proj"]),
    ),
    "ia3": (
        "peft_type is IA3",
        lambda b, o, e: peft_saved(
            b, o, __import__("peft").IA3Config(target_modules=["q_proj"], feedforward_modules=[])
        ),
    ),
    "loha": (
        "peft_type is LOHA",
        lambda b, o, e: peft_saved(b, o, __import__("peft").LoHaConfig(target_modules=["q_proj"])),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_not_plain_lora_is_refused_by_name(case, llama_dir, llama_experts, tmp_path):
    reason, make = CASES[case]
    bad = make(llama_dir, tmp_path / case, llama_experts[0])
    with pytest.raises(ExpertError, match=f"expert {case}") as e:
        ExpertLibrary.load([llama_experts[1], bad])
    assert reason in str(e.value)
    runner = CliRunner()
    res = runner.invoke(
        app, ["info", "--check", str(llama_experts[1]), str(bad)], env={"COLUMNS": "500"}
    )
    assert res.exit_code == 2 and reason in " ".join(res.output.split())
    out = tmp_path / "merged"
    res = runner.invoke(app, ["merge", str(llama_experts[1]), str(bad), "--out", str(out)])
    assert res.exit_code == 2 and reason in " ".join(res.output.split()) and not out.exists()
    assert "Traceback" not in res.output


def test_another_base_model_is_refused(llama_experts, tmp_path):
    other = edited(llama_experts[0], tmp_path / "other", base_model_name_or_path="org/other-7b")
    with pytest.raises(Exception, match="other.*org/other-7b"):
        ExpertLibrary.load([llama_experts[1], other])
