"""Library specs: benchmark folders and YAML files, with line numbers in errors."""

from __future__ import annotations

import pytest

from lorafuse.errors import LorafuseError
from lorafuse.spec import load_spec


def test_benchmark_folder(mini_bench):
    spec = load_spec(mini_bench)
    assert spec.experts.keys() == {"private", "shared"}
    assert spec.path(spec.base_model) == str(mini_bench / "base")


def test_yaml_relative_paths_and_unknown_key(tmp_path):
    f = tmp_path / "phi2.yaml"
    f.write_text(
        "base_model: microsoft/phi-2\ndata: data\nexperts:\n  private: experts\n"
        "dtype: bf16\ndevise: cuda\n"
    )
    with pytest.raises(LorafuseError, match=r"unknown key 'devise' \(line 6\)"):
        load_spec(f)
    f.write_text("base_model: microsoft/phi-2\ndata: ./data\nbatch_size: 0\n")
    with pytest.raises(LorafuseError, match=r"batch_size' \(line 3\)"):
        load_spec(f)
    f.write_text("base_model: microsoft/phi-2\ndata: ./data\n")
    spec = load_spec(f)
    assert spec.path(spec.base_model) == "microsoft/phi-2"  # a hub id stays a hub id
    assert spec.path(spec.data) == str(tmp_path / "data")
    with pytest.raises(LorafuseError, match="without manifest.json"):
        load_spec(tmp_path)
    with pytest.raises(LorafuseError, match="missing required key 'data'"):
        f.write_text("base_model: x\n")
        load_spec(f)


def test_binary_or_non_utf8_spec_names_the_file(tmp_path):
    f = tmp_path / "spec.yaml"
    f.write_bytes(b"\xff\xfe\x00\x01binary")
    with pytest.raises(LorafuseError, match=r"library spec: .*spec.yaml is not UTF-8 text"):
        load_spec(f)
