"""A build's manifest.json read back: the fields read are typed; file and field named."""

from __future__ import annotations

import json

import pytest

from lorafuse.errors import FileFormatError
from lorafuse.formats.manifest import read_manifest
from lorafuse.spec import load_spec
from lorafuse.study.library_info import build_structure

GOOD = {
    "format": "lorafuse-benchmark/1",
    "preset": "micro",
    "seed": 0,
    "settings": {
        "expert": {"steps": 10, "batch_size": 8, "replay": 0.25, "max_length": 64},
        "shared_steps": 20,
        "cluster_steps_per_task": True,
        "eval_batch_size": 16,
        "base": {"hidden": 32},
    },
    "families": [{"name": "f", "kind": "copy", "tasks": ["a", "b"]}],
    "tasks": [{"name": "a"}, {"name": "b"}],
    "experts": [{"name": "a", "kind": "private", "path": "experts/private/a", "tasks": ["a"]}],
    "stages": {"structure": {"seconds": 1.5, "kinds": {"private": {"ratio": 1.1}}}, "mbc": {}},
}


def write(tmp_path, manifest) -> object:
    (tmp_path / "experts").mkdir(exist_ok=True)
    path = tmp_path / "manifest.json"
    path.write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    return path


def test_good_manifest_reads_as_written(tmp_path):
    assert read_manifest(write(tmp_path, GOOD)) == GOOD
    assert read_manifest(write(tmp_path, {"tasks": ["a"]})) == {"tasks": ["a"]}  # minimal
    spec = load_spec(tmp_path)
    assert spec.max_length == 256  # the minimal manifest records none
    write(tmp_path, GOOD)
    assert (load_spec(tmp_path).max_length, load_spec(tmp_path).batch_size) == (64, 16)
    assert build_structure(read_manifest(tmp_path / "manifest.json"))["training"]


def changed(field: str, value):
    """GOOD with the dotted `field` set to `value` (a deep copy)."""
    manifest = json.loads(json.dumps(GOOD))
    *parents, last = field.split(".")
    node = manifest
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[int(last) if isinstance(node, list) else last] = value
    return manifest


@pytest.mark.parametrize(
    "field, value, said",
    [
        ("settings", None, "expected an object, got null"),
        ("settings.expert.max_length", "64", 'expected an integer, got "64"'),
        ("settings.expert.replay", 1.5, "expected a number < 1.0, got 1.5"),
        ("settings.expert.steps", float("nan"), "expected an integer, got NaN"),
        ("settings.eval_batch_size", 0, "expected a number > 0, got 0"),
        ("settings.cluster_steps_per_task", "yes", "expected true or false"),
        ("families.0.tasks", "a,b", 'expected a list, got "a,b"'),
        ("families", {"f": ["a"]}, "expected a list, got an object"),
        ("experts.0.kind", 3, "expected a string, got 3"),
        ("stages.structure.seconds", "1", "expected a number"),
        ("stages.offtask.kinds", ["mbc"], "expected an object, got a list"),
        ("stages", [], "expected an object, got a list"),
        ("preset", 3, "expected a string, got 3"),
    ],
)
def test_bad_manifest_fields(tmp_path, field, value, said):
    path = write(tmp_path, changed(field, value))
    with pytest.raises(FileFormatError, match="build manifest") as info:
        read_manifest(path)
    message = str(info.value)
    assert str(path) in message and f"field {field!r}: {said}" in message
    with pytest.raises(FileFormatError, match="build manifest"):
        load_spec(tmp_path)


def test_missing_manifest_field(tmp_path):
    manifest = changed("experts.0.kind", None)
    del manifest["experts"][0]["kind"]
    with pytest.raises(FileFormatError, match="field 'experts.0.kind': missing"):
        read_manifest(write(tmp_path, manifest))


@pytest.mark.parametrize(
    "text, said",
    [
        ("[]", "expected an object at the top level, got a list []"),
        (json.dumps(GOOD)[:80], "not valid JSON (empty or truncated?)"),
        ("", "not valid JSON (empty or truncated?)"),
    ],
)
def test_broken_manifest_files(tmp_path, text, said):
    write(tmp_path, text)
    with pytest.raises(FileFormatError, match="manifest.json") as info:
        load_spec(tmp_path)
    assert said in str(info.value)
