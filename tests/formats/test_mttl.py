"""mttl expert libraries -> PEFT adapters, checked against mttl's own LoRA formula."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from lorafuse.errors import ExpertError, LorafuseWarning, OutputExistsError
from lorafuse.formats.mttl import convert_library, read_library, resolve_library
from lorafuse.library import ExpertLibrary
from tests.conftest import load_base
from tests.formats.helpers import EXPERTS, write_mttl_expert


class NotData:  # a Python object in a pickle: weights_only loading must refuse it
    pass


@pytest.fixture
def mttl_lib(llama_dir, tmp_path) -> Path:
    folder = tmp_path / "mttl-library"
    folder.mkdir()
    for i, name in enumerate(EXPERTS):
        write_mttl_expert(folder, llama_dir, name, seed=10 + i)
    write_mttl_expert(folder, llama_dir, "gone", seed=99, expert_deleted=True)
    return folder


def mttl_forward(base_dir: Path, weights: dict, scaling: float, tokens) -> torch.Tensor:
    """Logits of the base model with mttl's merge: W += scaling (lora_a @ lora_b)^T."""
    model = load_base(base_dir)
    with torch.no_grad():
        for key, a in weights.items():
            if key.endswith(".lora_a"):
                module = key[: -len(".lora_a")]
                b = weights[f"{module}.lora_b"]
                model.get_submodule(module).weight += scaling * (a @ b).T  # (O, D)
        return model(tokens).logits


def test_converted_adapters_reproduce_mttl_experts(llama_dir, mttl_lib, tmp_path, tokens):
    written = convert_library(read_library(mttl_lib), tmp_path / "peft")
    assert [p.name for p in written] == ["cluster_0", "task_a"]  # the deleted one left out
    for path in written:
        rank, alpha, _, _ = EXPERTS[path.name]
        weights = torch.load(mttl_lib / f"{path.name}.ckpt", weights_only=True)
        want = mttl_forward(llama_dir, weights, alpha / rank, tokens)
        peft = PeftModel.from_pretrained(load_base(llama_dir), path).eval()
        with torch.no_grad():
            got = peft(tokens).logits
        assert not torch.allclose(want, load_base(llama_dir)(tokens).logits, atol=1e-3)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["r"] == rank and cfg["lora_alpha"] == alpha
        assert cfg["base_model_name_or_path"] == str(llama_dir)


def test_library_loads_with_tasks_and_scalings(mttl_lib, tmp_path):
    convert_library(read_library(mttl_lib), tmp_path / "peft")
    lib = ExpertLibrary.load([tmp_path / "peft"])
    assert lib.names == ["cluster_0", "task_a"]
    assert [e.tasks for e in lib.experts] == [["task_b", "task_c"], ["task_a"]]
    mod = lib.modules["model.layers.1.mlp.down_proj"]
    torch.testing.assert_close(mod.scale, torch.tensor([8.0 / 2, 16.0 / 4]))
    assert "model.layers.0.self_attn.k_proj" not in lib.modules  # only what mttl adapted


def test_selection_alpha_override_and_weights_alone(mttl_lib, tmp_path):
    lib = read_library(mttl_lib, alpha=4.0)
    convert_library(lib, tmp_path / "one", select=["task_a"])
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["task_a"]
    assert json.loads((tmp_path / "one/task_a/adapter_config.json").read_text())["lora_alpha"] == 4
    bare = read_library(mttl_lib, alpha=16.0, use_meta=False)
    assert sorted(e.name for e in bare) == ["cluster_0", "gone", "task_a"]
    assert all(e.tasks == [e.name] for e in bare)
    with pytest.raises(ExpertError, match="--alpha"):
        read_library(mttl_lib, use_meta=False)
    with pytest.raises(ExpertError, match="no mttl expert named nope; the library has"):
        convert_library(lib, tmp_path / "x", select=["nope"])
    assert not (tmp_path / "x").exists()


def test_unsafe_meta_is_refused_by_name(llama_dir, mttl_lib, tmp_path):
    write_mttl_expert(mttl_lib, llama_dir, "evil", seed=5, training_config=NotData())
    with pytest.raises(ExpertError, match=r"evil\.meta cannot be read safely.*--ignore-meta"):
        read_library(mttl_lib)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("no_ckpt", "has no task_a.ckpt beside it"),
        ("truncated", "unreadable or truncated"),
        ("not_lora", "is not a LoRA factor"),
        ("half", "has no lora_b"),
        ("nan", "NaN or Inf"),
        ("rank", "the .meta and .ckpt do not belong together"),
        ("modifier", "is a 'kv_adapter' expert, not LoRA"),
    ],
)
def test_bad_library_writes_nothing(llama_dir, mttl_lib, tmp_path, damage, message):
    ckpt = mttl_lib / "task_a.ckpt"
    weights = torch.load(ckpt, weights_only=True)
    key = next(iter(weights))
    if damage == "no_ckpt":
        ckpt.unlink()
    elif damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:100])
    elif damage == "not_lora":
        torch.save({**weights, "model.norm.weight": torch.ones(32)}, ckpt)
    elif damage == "half":
        torch.save({k: v for k, v in weights.items() if not k.endswith("lora_b")}, ckpt)
    elif damage == "nan":
        torch.save({**weights, key: weights[key] * float("nan")}, ckpt)
    elif damage == "rank":
        write_mttl_expert(mttl_lib, llama_dir, "task_a", seed=1)
        meta = torch.load(mttl_lib / "task_a.meta", weights_only=True)
        meta["expert_config"]["lora_rank"] = 8
        torch.save(meta, mttl_lib / "task_a.meta")
    elif damage == "modifier":
        meta = torch.load(mttl_lib / "task_a.meta", weights_only=True)
        meta["expert_config"]["__model_modifier__"] = "kv_adapter"
        torch.save(meta, mttl_lib / "task_a.meta")
    out = tmp_path / "peft"
    with pytest.raises(ExpertError, match=re.escape(message)):
        convert_library(read_library(mttl_lib), out)
    assert not out.exists() and not list(tmp_path.glob(".peft*"))


def test_existing_output_and_missing_sources(mttl_lib, tmp_path):
    (tmp_path / "peft").mkdir()
    with pytest.raises(OutputExistsError):
        convert_library(read_library(mttl_lib), tmp_path / "peft")
    convert_library(read_library(mttl_lib), tmp_path / "peft", force=True)
    assert (tmp_path / "peft/task_a/adapter_model.safetensors").is_file()
    with pytest.raises(ExpertError, match="not an mttl expert library"):
        read_library(tmp_path / "peft")
    with pytest.raises(ExpertError, match="does not exist"):
        resolve_library(tmp_path / "nowhere")


def test_hub_id_offline_says_how_to_fetch_it():
    # conftest sets HF_HUB_OFFLINE=1: the real huggingface_hub call fails without network.
    with pytest.raises(ExpertError, match="huggingface-cli download lorafuse-tests/no-such"):
        resolve_library("lorafuse-tests/no-such-library")


@pytest.mark.parametrize(
    "changes, said",
    [
        ({"expert_config": {"lora_rank": 4, "lora_alpha": float("nan")}},
         "field 'expert_config.lora_alpha': expected a finite number, got NaN"),
        ({"expert_config": {"lora_rank": "four", "lora_alpha": 16.0}},
         "field 'expert_config.lora_rank': expected an integer, got \"four\""),
        ({"expert_config": ["lora"]}, "field 'expert_config': expected an object"),
        ({"expert_task_name": 3}, "field 'expert_task_name': expected a string (comma-separ"),
        ({"expert_deleted": "no"}, "field 'expert_deleted': expected true or false"),
        ({"expert_model": 1.5}, "field 'expert_model': expected a string, got 1.5"),
        ({"training_config": {"model": None, "lora_alpha": float("inf")}},
         "field 'training_config.lora_alpha': expected a finite number, got Infinity"),
    ],
)  # fmt: skip
def test_bad_meta_values_are_refused_by_field(llama_dir, mttl_lib, changes, said):
    write_mttl_expert(mttl_lib, llama_dir, "task_a", seed=1, **changes)
    with pytest.raises(ExpertError, match="task_a.meta") as info:
        read_library(mttl_lib)
    assert "expert task_a" in str(info.value) and said in str(info.value)


def test_meta_that_is_not_a_mapping(mttl_lib):
    torch.save([1, 2], mttl_lib / "task_a.meta")
    with pytest.raises(ExpertError, match=r"task_a\.meta: expected an object at the top level"):
        read_library(mttl_lib)


ESCAPING = ["..", "../escape", "/tmp/abs", "a/../../b", "a//b", "a\\b", "a\x00"]


@pytest.mark.parametrize("name", ESCAPING)
def test_path_escaping_names_are_refused(llama_dir, mttl_lib, tmp_path, name):
    write_mttl_expert(mttl_lib, llama_dir, "task_a", seed=1, expert_name=name)
    with pytest.raises(ExpertError, match="not a plain relative name") as info:
        convert_library(read_library(mttl_lib), tmp_path / "out" / "peft")
    assert repr(name) in str(info.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape").exists()


def test_names_of_weights_alone_are_checked(mttl_lib, tmp_path):
    (mttl_lib / "task_a.ckpt").rename(mttl_lib / "...ckpt")
    with pytest.raises(ExpertError, match="'..'.*not a plain relative name"):
        read_library(mttl_lib, alpha=16.0, use_meta=False)


def test_sub_folder_experts_convert_to_flat_folders(llama_dir, mttl_lib, tmp_path, tokens):
    (mttl_lib / "group" / "deeper").mkdir(parents=True)
    weights = write_mttl_expert(
        mttl_lib / "group", llama_dir, "task_a", seed=1, expert_name="group/task_a"
    )
    write_mttl_expert(mttl_lib / "group" / "deeper", llama_dir, "x", seed=2, expert_name=None)
    lib = read_library(mttl_lib)
    assert [e.name for e in lib] == ["cluster_0", "group/deeper/x", "group/task_a", "task_a"]
    out = tmp_path / "peft"
    written = convert_library(lib, out)
    flat = ["cluster_0", "group--deeper--x", "group--task_a", "task_a"]
    assert [p.name for p in written] == flat
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    meta = json.loads((out / "group--task_a" / "lorafuse_expert.json").read_text())
    assert meta["mttl_expert"] == "group/task_a"
    # the converted sub-folder expert reproduces mttl's forward, as the top-level ones do
    rank, alpha, _, _ = EXPERTS["task_a"]
    ref = mttl_forward(llama_dir, weights, alpha / rank, tokens)
    model = PeftModel.from_pretrained(load_base(llama_dir), out / "group--task_a").eval()
    assert (model(tokens).logits - ref).abs().max() <= 1e-5
    lib2 = ExpertLibrary.load([out])
    assert lib2.names == flat


def test_sub_folder_meta_without_its_ckpt_fails_loudly(llama_dir, mttl_lib):
    (mttl_lib / "group").mkdir()
    write_mttl_expert(mttl_lib / "group", llama_dir, "task_a", seed=1, expert_name="group/t")
    (mttl_lib / "group" / "task_a.ckpt").unlink()
    with pytest.raises(ExpertError, match="expert group/t: task_a.meta has no"):
        read_library(mttl_lib)


def test_colliding_folder_names_are_refused(llama_dir, mttl_lib, tmp_path):
    (mttl_lib / "a").mkdir()
    write_mttl_expert(mttl_lib / "a", llama_dir, "task_a", seed=1, expert_name="a/b")
    write_mttl_expert(mttl_lib, llama_dir, "task_b", seed=2, expert_name="a--b")
    with pytest.raises(ExpertError, match="'a--b' and 'a/b'|'a/b' and 'a--b'"):
        convert_library(read_library(mttl_lib), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_ckpt_files_without_meta_are_reported(llama_dir, mttl_lib):
    import shutil

    shutil.copy(mttl_lib / "cluster_0.ckpt", mttl_lib / "stray.ckpt")
    with pytest.warns(LorafuseWarning, match="1 .ckpt file.*stray.ckpt.*--ignore-meta"):
        read_library(mttl_lib)
