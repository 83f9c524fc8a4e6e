"""routed.json and routers.safetensors: written atomically, read back checked, and a bad
file named with its field. Saving and loading a routed model is tests/test_routed.py."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lorafuse.errors import LorafuseError, OutputExistsError
from lorafuse.formats.routed import (
    CONFIG_NAME,
    ROUTERS_NAME,
    read_routed,
    read_routers,
    write_routed,
)

CONFIG = {
    "space": "factors",
    "router": "linear",
    "top_k": None,
    "temperature": None,
    "absolute": False,
    "experts": [{"name": "e0", "path": "/x/e0"}, {"name": "e1", "path": "/x/e1"}],
    "base_model": "pico",
    "modules": ["m.q"],
    "settings": {"lr": 0.01},
}
TENSORS = {"m.q.weight": torch.randn(2, 8), "m.q.bias": torch.randn(2)}


def test_write_then_read_gives_the_same_config_and_tensors(tmp_path):
    out = write_routed(tmp_path / "routed", CONFIG, TENSORS)
    assert read_routed(out) == {"format": "lorafuse-routed", "version": 1, **CONFIG}
    state = read_routers(out)
    assert state.keys() == TENSORS.keys()
    assert all(torch.equal(state[k], TENSORS[k]) for k in TENSORS)
    with pytest.raises(OutputExistsError):
        write_routed(out, CONFIG, TENSORS)
    write_routed(out, {**CONFIG, "top_k": 1}, TENSORS, force=True)
    assert read_routed(out)["top_k"] == 1


@pytest.mark.parametrize(
    "change, said",
    [
        ({"space": "both"}, "field 'space': expected 'factors' or 'deltas', got \"both\""),
        ({"router": 3}, "field 'router': expected 'arrow' or 'linear', got 3"),
        ({"top_k": 0}, "field 'top_k': expected a number > 0, got 0"),
        ({"top_k": "2"}, "field 'top_k': expected an integer, got \"2\""),
        ({"absolute": "no"}, "field 'absolute': expected true or false"),
        ({"experts": [{"name": "e0"}]}, "field 'experts.0.path': missing (expected a string)"),
        ({"experts": "e0,e1"}, "field 'experts': expected a list"),
        ({"modules": None}, "field 'modules': expected a list, got null"),
        ({"router": "arrow", "temperature": None}, "field 'temperature': arrow routers need"),
        ({"router": "arrow", "temperature": float("nan")}, "'temperature': expected a finite"),
    ],
)
def test_bad_routed_json_names_file_and_field(tmp_path, change, said):
    out = write_routed(tmp_path / "routed", {**CONFIG, **change}, TENSORS)
    with pytest.raises(LorafuseError, match="routed.json") as info:
        read_routed(out)
    assert said in str(info.value)


def test_broken_routed_files(tmp_path):
    with pytest.raises(LorafuseError, match="not a routed model folder"):
        read_routed(tmp_path)
    out = write_routed(tmp_path / "routed", CONFIG, TENSORS)
    text = (out / CONFIG_NAME).read_text()
    for bad, said in [
        (text[:50], "not valid JSON (empty or truncated?)"),
        ("[1]", "is not a lorafuse-routed v1 file"),
        (json.dumps({**json.loads(text), "version": 2}), "version 2"),
    ]:
        (out / CONFIG_NAME).write_text(bad)
        with pytest.raises(LorafuseError, match=re.escape(said)):
            read_routed(out)
    routers = (out / ROUTERS_NAME).read_bytes()
    (out / ROUTERS_NAME).write_bytes(routers[:100])
    with pytest.raises(LorafuseError, match="routers.safetensors is not a readable safetensors"):
        read_routers(out)
    (out / ROUTERS_NAME).unlink()
    with pytest.raises(LorafuseError, match="routers.safetensors is missing"):
        read_routers(out)
