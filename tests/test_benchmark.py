"""`benchmark build` end to end on the micro preset: manifest, resume, CLI, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lorafuse.benchmark import build
from lorafuse.cli import app
from lorafuse.data.errors import DataError

runner = CliRunner()


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "a"
    return root, build(root, "micro", seed=0)


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_manifest_lists_tasks_experts_and_stages(built):
    root, manifest = built
    assert json.loads((root / "manifest.json").read_text()) == manifest
    names = [t["name"] for t in manifest["tasks"]]
    assert len(names) == 4 and len(manifest["families"]) == 2
    assert set(manifest["stages"]) == {"data", "base", "private", "shared", "evaluate"}
    private = [e for e in manifest["experts"] if e["kind"] == "private"]
    assert [e["tasks"] for e in private] == [[n] for n in names]
    for e in manifest["experts"]:
        meta = json.loads((root / e["path"] / "lorafuse_expert.json").read_text())
        assert meta["tasks"] == e["tasks"]
    shared = [e for e in manifest["experts"] if e["kind"] == "shared"]
    assert shared[0]["path"] == "experts/shared" and shared[0]["tasks"] == names
    assert (root / "base" / "config.json").is_file() and (
        root / "base" / "tokenizer.json"
    ).is_file()
    assert list((root / "data").glob("*.parquet"))


def test_evaluation_matches_plain_peft(built):
    from tests.evalref import reference_task_losses

    root, manifest = built
    report = json.loads((root / "evaluation.json").read_text())
    assert set(report["per_task"]) == {"base", "oracle", "uniform_merge", "shared"}
    task = manifest["tasks"][1]["name"]
    base = reference_task_losses(root, "test", tasks=[task])[task]
    assert base == pytest.approx(report["per_task"]["base"][task], abs=1e-5)
    own = reference_task_losses(root, "test", root / "experts" / "private" / task, [task])[task]
    assert own == pytest.approx(report["per_task"]["oracle"][task], abs=1e-5)


def test_interrupted_build_resumes_to_the_same_result(built, tmp_path):
    root_a, manifest_a = built
    root_b = tmp_path / "b"
    saved = []

    def stop_after_one(name):
        saved.append(name)
        raise Stop

    with pytest.raises(Stop):
        build(root_b, "micro", seed=0, on_expert=stop_after_one)
    partial = json.loads((root_b / "manifest.json").read_text())
    assert set(partial["stages"]) == {"data", "base"}
    assert len(list((root_b / "experts" / "private").iterdir())) == 1
    (root_b / "experts" / "private" / ".x.tmp-killed").mkdir()  # as a killed build leaves
    again = build(root_b, "micro", seed=0)
    assert set(again["stages"]) == set(manifest_a["stages"])
    assert again["stages"]["base"] == partial["stages"]["base"]  # not redone
    for e in manifest_a["experts"]:
        a, b = _tensors(root_a / e["path"]), _tensors(root_b / e["path"])
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), e["name"]
    assert not [p for p in root_b.rglob("*") if ".tmp-" in p.name]


def test_bad_preset_and_foreign_folder(built, tmp_path):
    root, _ = built
    with pytest.raises(DataError, match="unknown preset 'huge'"):
        build(tmp_path / "x", "huge")
    assert not (tmp_path / "x").exists()
    with pytest.raises(DataError, match="seed 0.*--force"):
        build(root, "micro", seed=1)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="non-empty folder"):
        build(tmp_path / "junk", "micro")


def test_cli_build_errors_and_train_expert(built, tmp_path):
    root, manifest = built
    res = runner.invoke(app, ["benchmark", "build", "--preset", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown preset 'nope'" in res.output
    task = manifest["tasks"][0]["name"]
    out = tmp_path / "mine"
    args = [
        "train-expert",
        "--base",
        str(root / "base"),
        "--data",
        str(root / "data"),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--threads",
        "1",
    ]
    res = runner.invoke(app, [*args, "--tasks", task])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "lorafuse_expert.json").read_text())["tasks"] == [task]
    res = runner.invoke(app, [*args, "--tasks", task])
    assert res.exit_code == 2 and "exists" in res.output
    res = runner.invoke(app, [*args, "--tasks", "nope", "--force"])
    assert res.exit_code == 2 and "nope" in res.output
