"""ExpertLibrary: loading, padding, scalings, metadata, and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafuse.errors import ExpertError, LibraryMismatchError
from lorafuse.library import ExpertLibrary
from tests.conftest import LLAMA_EXPERTS, LLAMA_TARGETS, make_adapter

ST = "adapter_model.safetensors"


def copy_expert(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_stacks_with_padding_and_scalings(llama_experts):
    lib = ExpertLibrary.load(llama_experts)
    assert lib.names == ["e0", "e1", "e2", "e3"]
    q = lib.modules["model.layers.0.self_attn.q_proj"]
    down = lib.modules["model.layers.1.mlp.down_proj"]
    N, R, D, O = q.shape
    assert (N, R, D, O) == (4, 4, 32, 32)
    # Ranks: e1 r=2, e3 q_proj r=2 by rank_pattern, otherwise 3.
    assert q.rank.tolist() == [4, 2, 4, 2]
    assert down.rank.tolist() == [4, 2, 4, 3]
    # Scalings written out from the configs: alpha/r, rsLoRA alpha/sqrt(r), patterns.
    expected_q = [16 / 4, 8 / 2, 4 / math.sqrt(4), 16 / 2]
    expected_down = [16 / 4, 8 / 2, 4 / math.sqrt(4), 5 / 3]
    torch.testing.assert_close(q.scale, torch.tensor(expected_q))
    torch.testing.assert_close(down.scale, torch.tensor(expected_down))
    # The tensors are the files' tensors, zero-padded.
    sd = load_file(str(llama_experts[1] / ST))
    a = sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(q.A[1, :2], a)
    torch.testing.assert_close(q.B[1, :, :2], b)
    assert q.A[1, 2:].abs().sum() == 0 and q.B[1, :, 2:].abs().sum() == 0


def test_folder_of_folders_and_metadata(llama_experts, tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    for i, p in enumerate(llama_experts[:2]):
        copy_expert(p, root / f"x{i}")
    (root / "x1" / "lorafuse_expert.json").write_text(json.dumps({"tasks": ["t1", "t2"]}))
    lib = ExpertLibrary.load([root])
    assert lib.names == ["x0", "x1"]
    assert lib.experts[1].tasks == ["t1", "t2"]
    assert lib.subset(["x1"]).names == ["x1"]
    assert lib.describe()[0]["params"] == sum(
        t.numel() for t in load_file(str(root / "x0" / ST)).values()
    )


def test_bin_weights_loaded_weights_only(llama_experts, tmp_path):
    d = copy_expert(llama_experts[0], tmp_path / "binexp")
    sd = load_file(str(d / ST))
    (d / ST).unlink()
    torch.save(sd, d / "adapter_model.bin")
    lib = ExpertLibrary.load([d, llama_experts[0]])
    for mod in lib.modules.values():
        torch.testing.assert_close(mod.A[0], mod.A[1])


def test_different_target_modules_fuse_over_the_union(llama_dir, llama_experts, tmp_path):
    other = make_adapter(llama_dir, tmp_path / "qonly", 5, ["q_proj"], r=4, lora_alpha=8)
    lib = ExpertLibrary.load([other, llama_experts[0]])
    assert set(lib.modules) == set(ExpertLibrary.load([llama_experts[0]]).modules)
    assert all("q_proj" in m for m in lib.covered(0)) and len(lib.covered(0)) == 2


def test_mismatched_shapes(llama_experts, tmp_path):
    d = copy_expert(llama_experts[0], tmp_path / "wide")
    sd = load_file(str(d / ST))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    sd[key] = torch.randn(4, 40)
    save_file(sd, str(d / ST))
    with pytest.raises(LibraryMismatchError, match="wide, module model.layers.0.self_attn.q_proj"):
        ExpertLibrary.load([llama_experts[0], d])


def test_nan_weights(llama_experts, tmp_path):
    d = copy_expert(llama_experts[0], tmp_path / "nanexp")
    sd = load_file(str(d / ST))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    sd[key][0, 0] = float("nan")
    save_file(sd, str(d / ST))
    with pytest.raises(ExpertError, match="nanexp.*layers.1.mlp.up_proj.*NaN"):
        ExpertLibrary.load([d])


def test_missing_and_truncated_weights(llama_experts, tmp_path):
    d = copy_expert(llama_experts[0], tmp_path / "noweights")
    (d / ST).unlink()
    with pytest.raises(ExpertError, match="noweights.*no adapter_model.safetensors"):
        ExpertLibrary.load([d])
    t = copy_expert(llama_experts[0], tmp_path / "truncated")
    data = (t / ST).read_bytes()
    (t / ST).write_bytes(data[: len(data) // 2])
    with pytest.raises(ExpertError, match="truncated.*cannot read"):
        ExpertLibrary.load([t])


def test_dora_and_other_non_lora(llama_dir, llama_experts, tmp_path):
    dora = make_adapter(
        llama_dir, tmp_path / "dora", 3, LLAMA_TARGETS, r=4, lora_alpha=8, use_dora=True
    )
    with pytest.raises(ExpertError, match="dora.*DoRA"):
        ExpertLibrary.load([dora])
    d = copy_expert(llama_experts[0], tmp_path / "savemods")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["lm_head"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExpertError, match="savemods.*modules_to_save"):
        ExpertLibrary.load([d])


def test_base_model_mismatch_and_bad_paths(llama_experts, tmp_path):
    d = copy_expert(llama_experts[1], tmp_path / "otherbase")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "microsoft/phi-2"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LibraryMismatchError, match="otherbase.*phi-2"):
        ExpertLibrary.load([llama_experts[0], d])
    with pytest.raises(ExpertError, match="does not exist"):
        ExpertLibrary.load([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExpertError, match="not a PEFT adapter folder"):
        ExpertLibrary.load([tmp_path / "empty"])


def test_unique_names_for_same_folder_names(llama_experts, tmp_path):
    a = copy_expert(llama_experts[0], tmp_path / "a" / "expert")
    b = copy_expert(llama_experts[1], tmp_path / "b" / "expert")
    assert ExpertLibrary.load([a, b]).names == ["a/expert", "b/expert"]
    assert len(LLAMA_EXPERTS) == 4
