"""Result files read back for `lorafuse report`: typed fields, the file and field named."""

from __future__ import annotations

import json
import math

import pytest

from lorafuse.errors import FileFormatError, LorafuseError
from lorafuse.report import load_results, markdown_table

GOOD = {
    "method": "uniform",
    "split": "test",
    "mean": 1.5,
    "se": 0.1,
    "n_tasks": 2,
    "token_mean": 1.4,
    "settings": {"experts": "private"},
    "per_task": {"a": {"loss": 1.0, "n_examples": 2}, "b": {"loss": 2.0, "n_examples": 1}},
}


def test_good_files_and_folders_load(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(GOOD))
    diverged = {**GOOD, "method": "bad", "mean": float("nan")}  # lorafuse writes what it got
    del diverged["n_tasks"]
    (tmp_path / "s.json").write_text(json.dumps(diverged))
    results = load_results([tmp_path])
    assert [r.method for r in results] == ["uniform", "bad"] and math.isnan(results[1].mean)
    assert results[1].n_tasks == 2 and results[0].per_task["a"]["n_examples"] == 2
    assert "| uniform | private | test | 2 |" in markdown_table(results)


@pytest.mark.parametrize(
    "change, said",
    [
        ({"mean": "1.5"}, "field 'mean': expected a number, got \"1.5\""),
        ({"mean": None}, "field 'mean': expected a number, got null"),
        ({"se": [0.1]}, "field 'se': expected a number, got a list"),
        ({"method": 3}, "field 'method': expected a string, got 3"),
        ({"n_tasks": -1}, "field 'n_tasks': expected a number >= 0"),
        ({"per_task": {"a": {"loss": "x"}}}, "field 'per_task.a.loss': expected a number"),
        ({"per_task": ["a"]}, "field 'per_task': expected an object, got a list"),
        ({"settings": None}, "field 'settings': expected an object, got null"),
    ],
)
def test_bad_result_fields(tmp_path, change, said):
    (tmp_path / "r.json").write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(FileFormatError, match="result file") as info:
        load_results([tmp_path / "r.json"])
    assert str(tmp_path / "r.json") in str(info.value) and said in str(info.value)


def test_missing_truncated_and_non_object_files(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({k: v for k, v in GOOD.items() if k != "split"}))
    with pytest.raises(FileFormatError, match="field 'split': missing"):
        load_results([tmp_path / "r.json"])
    (tmp_path / "r.json").write_text(json.dumps(GOOD)[:40])
    with pytest.raises(FileFormatError, match="not valid JSON"):
        load_results([tmp_path / "r.json"])
    (tmp_path / "r.json").write_text("[]")
    with pytest.raises(FileFormatError, match="an object at the top level, got a list"):
        load_results([tmp_path])
    with pytest.raises(LorafuseError, match="does not exist"):
        load_results([tmp_path / "nope.json"])


def test_answers_are_read_back_and_shown(tmp_path):
    answers = {
        "exact_match": {"mean": 0.5, "se": 0.25},
        "rouge_l": {"mean": 0.75, "se": 0.125},
        "n_tasks": 2,
        "per_task": {"a": {"exact_match": 1.0, "rouge_l": 1.0, "n_examples": 2}},
    }
    (tmp_path / "r.json").write_text(json.dumps({**GOOD, "answers": answers}))
    (tmp_path / "s.json").write_text(json.dumps(GOOD))  # an older file: no answers
    results = load_results([tmp_path])
    assert results[0].answers == answers and results[1].answers is None
    table = markdown_table(results)
    assert "exact match | Rouge-L |" in table
    assert "| 0.5000 +- 0.2500 | 0.7500 +- 0.1250 |" in table
    bad = {**answers, "exact_match": {"mean": "x", "se": 0}}
    (tmp_path / "r.json").write_text(json.dumps({**GOOD, "answers": bad}))
    with pytest.raises(FileFormatError, match="answers.exact_match.mean"):
        load_results([tmp_path / "r.json"])
