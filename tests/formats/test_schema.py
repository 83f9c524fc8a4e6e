"""The shared typed reader: strict JSON fields, one message naming file, field and value."""

from __future__ import annotations

import json

import pytest
from pydantic import Field

from lorafuse.errors import ExpertError, FileFormatError, LorafuseError
from lorafuse.formats.schema import (
    FileModel,
    Finite,
    FiniteArray,
    PositiveInt,
    one_of,
    parse_json,
    read_json,
    show,
)


class Inner(FileModel):
    name: str


class Sample(FileModel):
    count: PositiveInt
    scale: Finite = 1.0
    flag: bool = False
    names: list[str] = Field(default_factory=list)
    inner: Inner | None = None
    grid: FiniteArray = None
    either: one_of("a string or a list of strings", str, list[str]) = "x"


def write(tmp_path, text: str):
    path = tmp_path / "sample.json"
    path.write_text(text)
    return path


def test_good_file_loads_and_keeps_unknown_keys(tmp_path):
    path = write(tmp_path, '{"count": 2, "scale": 3, "grid": [[1, 2.5]], "extra": NaN}')
    got = parse_json(path, Sample)
    assert got.count == 2 and got.scale == 3.0 and got.grid == [[1, 2.5]]
    assert got.model_extra is not None and "extra" in got.model_extra


@pytest.mark.parametrize(
    "text, field, shown",
    [
        ('{"count": "four"}', "'count': expected an integer", 'got "four"'),
        ('{"count": 2.0}', "'count': expected an integer", "got 2.0"),
        ('{"count": true}', "'count': expected an integer", "got true"),
        ('{"count": 0}', "'count': expected a number > 0", "got 0"),
        ('{"count": 1, "scale": NaN}', "'scale': expected a finite number", "got NaN"),
        ('{"count": 1, "scale": -Infinity}', "'scale': expected a finite", "got -Infinity"),
        ('{"count": 1, "scale": null}', "'scale': expected a number", "got null"),
        ('{"count": 1, "flag": 1}', "'flag': expected true or false", "got 1"),
        ('{"count": 1, "names": ["a", 2]}', "'names.1': expected a string", "got 2"),
        ('{"count": 1, "inner": {}}', "'inner.name': missing (expected a string)", ""),
        ('{"count": 1, "inner": []}', "'inner': expected an object", "got a list []"),
        ('{"count": 1, "grid": [[1, NaN]]}', "'grid': expected a (nested) list", "got a list"),
        ('{"count": 1, "either": 3}', "'either': expected a string or a list", "got 3"),
        ('{"scale": 1}', "'count': missing (expected an integer)", ""),
        ("[1, 2]", "expected an object at the top level", "got a list [1, 2]"),
        ("null", "expected an object at the top level", "got null"),
    ],
)
def test_bad_fields_name_file_field_and_value(tmp_path, text, field, shown):
    path = write(tmp_path, text)
    with pytest.raises(FileFormatError) as info:
        parse_json(path, Sample)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and field in message and shown in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "text, said",
    [
        ('{"count": 2', "not valid JSON (empty or truncated?)"),
        ("", "not valid JSON (empty or truncated?)"),
        ("{'count': 2}", "not valid JSON: Expecting property name"),
    ],
)
def test_invalid_json_names_the_file(tmp_path, text, said):
    path = write(tmp_path, text)
    with pytest.raises(FileFormatError, match="line 1, column") as info:
        read_json(path)
    assert str(path) in str(info.value) and said in str(info.value)


def test_missing_binary_and_folder_paths(tmp_path):
    with pytest.raises(FileFormatError, match="nope.json does not exist"):
        read_json(tmp_path / "nope.json")
    with pytest.raises(FileFormatError, match="is a folder"):
        read_json(tmp_path)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FileFormatError, match="not UTF-8"):
        read_json(tmp_path / "bin.json")


def test_error_class_label_and_many_errors(tmp_path):
    path = write(tmp_path, json.dumps({"count": "a", "names": list(range(9))}))
    with pytest.raises(ExpertError) as info:
        parse_json(path, Sample, ExpertError, "expert e")
    message = str(info.value)
    assert isinstance(info.value, LorafuseError)
    assert message.startswith(f"expert e: {path}: field 'count'") and "and 5 more" in message


def test_show_is_short_and_plain():
    assert show(float("nan")) == "NaN" and show(None) == "null" and show("a") == '"a"'
    assert len(show(list(range(100)))) < 80 and show({"a": 1}) == 'an object {"a": 1}'
