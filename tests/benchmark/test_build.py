"""`benchmark build` end to end on the micro preset: manifest, cluster (MBC) experts,
resume (also of a build made before the mbc stage existed), CLI, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from lorafuse.benchmark.build import BuildSettings, build, preset_settings
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
    assert set(manifest["stages"]) == {
        "data", "base", "private", "structure", "shared", "mbc", "offtask", "evaluate"
    }  # fmt: skip
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
    assert set(report["per_task"]) == {"base", "oracle", "mbc_oracle", "uniform_merge", "shared"}
    task = manifest["tasks"][1]["name"]
    base = reference_task_losses(root, "test", tasks=[task])[task]
    assert base == pytest.approx(report["per_task"]["base"][task], abs=1e-5)
    own = reference_task_losses(root, "test", root / "experts" / "private" / task, [task])[task]
    assert own == pytest.approx(report["per_task"]["oracle"][task], abs=1e-5)


def _greedy_k(L, target):
    # Greedy task-level selection written out: add the expert that lowers the mean of the
    # per-task minimum most, until it reaches the target.
    chosen, best = [], [float("inf")] * len(L[0])
    for k in range(1, len(L) + 1):
        rows = {
            j: [min(a, b) for a, b in zip(best, L[j])] for j in range(len(L)) if j not in chosen
        }
        j = min(rows, key=lambda j: (sum(rows[j]), j))
        chosen.append(j)
        best = rows[j]
        if sum(best) / len(best) <= target + 1e-9:
            return k
    return None


def test_structure_statistics_match_plain_peft(built):
    from tests.evalref import reference_task_losses

    root, manifest = built
    saved = json.loads((root / "structure.json").read_text())
    names = [t["name"] for t in manifest["tasks"]]
    L = [  # L[i][t]: private expert i on task t, validation, by plain PEFT
        [reference_task_losses(root, "validation", root / "experts" / "private" / e, [t])[t]
         for t in names]
        for e in names
    ]  # fmt: skip
    assert saved["matrix"]["tasks"] == sorted(names)
    got = {(e, t): saved["matrix"]["losses"][i][saved["matrix"]["tasks"].index(t)]
           for i, e in enumerate(saved["matrix"]["experts"]) for t in names}  # fmt: skip
    for i, e in enumerate(names):
        for j, t in enumerate(names):
            assert got[e, t] == pytest.approx(L[i][j], abs=1e-5)
    not_best = [e for i, e in enumerate(names) if min(r[i] for r in L) < L[i][i]]
    assert sorted(saved["not_best_experts"]) == sorted(not_best)
    assert saved["not_best_share"] == pytest.approx(len(not_best) / len(names), abs=1e-4)
    oracle = sum(L[i][i] for i in range(len(names))) / len(names)
    k = _greedy_k(L, oracle)
    assert saved["greedy_experts"] == k
    assert saved["greedy_share"] == pytest.approx(k / len(names), abs=1e-4)
    assert manifest["stages"]["structure"]["not_best_share"] == saved["not_best_share"]
    # the off-task ratio, written out: expert i's loss on the other tasks over the base's
    base = reference_task_losses(root, "validation")
    ratios = [
        sum(L[i][j] / base[t] for j, t in enumerate(names) if j != i) / (len(names) - 1)
        for i in range(len(names))
    ]
    assert saved["max_examples_per_task"] is None  # the full validation split
    assert saved["off_task_ratio"] == pytest.approx(sum(ratios) / len(ratios), abs=1e-4)
    assert saved["kinds"]["private"]["ratio"] == saved["off_task_ratio"]
    # the cluster experts' ratio (offtask stage): each over the tasks outside its cluster
    clusters = {e["name"]: e["tasks"] for e in manifest["experts"] if e["kind"] == "mbc"}
    per = []
    for name, own in clusters.items():
        other = [t for t in names if t not in own]
        if other:
            loss = reference_task_losses(root, "validation", root / "experts" / "mbc" / name)
            per.append(sum(loss[t] / base[t] for t in other) / len(other))
    got = manifest["stages"]["offtask"]["kinds"]["mbc"]["ratio"]
    assert got == pytest.approx(sum(per) / len(per), abs=1e-4)
    assert saved["kinds"]["mbc"]["ratio"] == got


def test_cluster_experts_train_the_private_steps_per_task(built):
    from lorafuse.benchmark.build import training_budget

    root, manifest = built
    steps = manifest["settings"]["expert"]["steps"]
    for e in manifest["experts"]:
        meta = json.loads((root / e["path"] / "lorafuse_expert.json").read_text())
        if e["kind"] == "mbc":
            assert meta["steps"] == steps * len(e["tasks"])
        elif e["kind"] == "private":
            assert meta["steps"] == steps
    budget = training_budget(manifest)
    b = manifest["settings"]["expert"]["batch_size"]
    assert budget["private"]["examples_per_task"] == steps * b
    assert budget["mbc"]["examples_per_task"] == steps * b  # as often as a private expert
    shared = manifest["settings"]["shared_steps"] * b / len(manifest["tasks"])
    assert budget["shared"]["examples_per_task"] == pytest.approx(shared, abs=0.1)


def test_cli_build_prints_the_structure(built):
    root, _ = built
    result = runner.invoke(app, ["benchmark", "build", "--preset", "micro", "--out", str(root)])
    assert result.exit_code == 0, result.output
    assert "not the best expert on their own task" in result.output
    assert "greedy selection recovers the private oracle" in result.output
    assert "off-task loss / base model's: private" in result.output
    assert "training examples per task: private 24 (6 steps); shared 6 (6 steps); mbc 24" in (
        " ".join(result.output.split())
    )


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


def _mbc(root):
    """{cluster expert name: its tasks}, read from the saved experts themselves."""
    out = {}
    for d in sorted((root / "experts" / "mbc").iterdir()):
        out[d.name] = json.loads((d / "lorafuse_expert.json").read_text())["tasks"]
    return out


def test_cluster_experts_partition_the_tasks(built):
    from sklearn.metrics import adjusted_rand_score

    root, manifest = built
    names = [t["name"] for t in manifest["tasks"]]
    mbc = _mbc(root)
    assert list(mbc) == ["cluster_0", "cluster_1"]  # k = 2 for micro
    assert sorted(t for tasks in mbc.values() for t in tasks) == sorted(names)
    assert all(mbc.values())
    listed = {e["name"]: e for e in manifest["experts"] if e["kind"] == "mbc"}
    assert {n: e["tasks"] for n, e in listed.items()} == mbc
    assert listed["cluster_0"]["path"] == "experts/mbc/cluster_0"
    stage = manifest["stages"]["mbc"]
    assert [c["tasks"] for c in stage["clusters"]] == list(mbc.values())
    assert [c["experts"] for c in stage["clusters"]] == list(mbc.values())  # private = task
    family = {t["name"]: t["family"] for t in manifest["tasks"]}
    cluster_of = {t: c for c, tasks in enumerate(mbc.values()) for t in tasks}
    ari = adjusted_rand_score([family[t] for t in names], [cluster_of[t] for t in names])
    assert stage["adjusted_rand_index"] == pytest.approx(ari, abs=1e-4)
    assert json.loads((root / "clusters.json").read_text())["clusters"] == stage["clusters"]


def test_oracle_over_cluster_experts(built):
    from lorafuse.methods.run import evaluate_method
    from lorafuse.spec import load_spec
    from lorafuse.workspace import Workspace
    from tests.evalref import reference_task_losses

    root, manifest = built
    ws = Workspace(load_spec(root))
    owner = {t: name for name, tasks in _mbc(root).items() for t in tasks}
    assert ws.task_map("mbc") == owner
    r = evaluate_method(ws, "oracle", "test", kind="mbc")
    report = json.loads((root / "evaluation.json").read_text())
    assert report["summary"]["mbc_oracle"]["mean"] == pytest.approx(r.mean, abs=1e-5)
    for name in _mbc(root):
        alone = evaluate_method(ws, f"single:{name}", "test", kind="mbc")
        for task in (t for t, e in owner.items() if e == name):
            assert r.per_task[task]["loss"] == pytest.approx(alone.per_task[task]["loss"])
    task = manifest["tasks"][1]["name"]  # as in test_evaluation_matches_plain_peft
    expert = root / "experts" / "mbc" / owner[task]
    ref = reference_task_losses(root, "test", expert, [task])[task]
    assert r.per_task[task]["loss"] == pytest.approx(ref, abs=1e-5)


def test_build_made_before_the_mbc_stage_resumes_with_it_alone(built, tmp_path):
    root_a, manifest_a = built
    old = tmp_path / "old"
    shutil.copytree(root_a, old)
    shutil.rmtree(old / "experts" / "mbc")
    (old / "clusters.json").unlink()
    m = json.loads((old / "manifest.json").read_text())
    del m["settings"]["clusters"], m["stages"]["mbc"]
    m["experts"] = [e for e in m["experts"] if e["kind"] != "mbc"]
    (old / "manifest.json").write_text(json.dumps(m))
    evaluation = (old / "evaluation.json").read_bytes()
    saved = []

    def stop_at_second(name):
        saved.append(name)
        if len(saved) == 1:
            raise Stop

    with pytest.raises(Stop):  # interrupted inside the mbc stage, after one cluster expert
        build(old, "micro", seed=0, on_expert=stop_at_second)
    assert len(list((old / "experts" / "mbc").iterdir())) == 1
    bars = []
    again = build(
        old, "micro", seed=0, on_progress=lambda *a: bars.append(a), on_expert=saved.append
    )
    assert saved == ["cluster_0", "cluster_1"]  # only the missing expert was written again
    for stage in ("data", "base", "private", "structure", "shared", "evaluate"):
        assert again["stages"][stage] == m["stages"][stage]  # kept, not redone
        assert [b for b in bars if b[0] == stage] == [(stage, 1, 1)]
    assert again["stages"]["mbc"]["clusters"] == manifest_a["stages"]["mbc"]["clusters"]
    assert again["experts"] == manifest_a["experts"]
    assert (old / "evaluation.json").read_bytes() == evaluation
    for name in ("cluster_0", "cluster_1"):
        a, b = _tensors(root_a / "experts" / "mbc" / name), _tensors(old / "experts" / "mbc" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_bad_cluster_count():
    for k in (0, 5, 2.0):
        with pytest.raises(DataError, match=f"clusters={k!r}.*1..4"):
            BuildSettings(**{**preset_settings("micro").__dict__, "clusters": k})
    assert [preset_settings(p).clusters for p in ("micro", "tiny", "small", "full")] == [
        2,
        4,
        8,
        10,
    ]


def test_bad_preset_and_foreign_folder(built, tmp_path):
    root, _ = built
    with pytest.raises(DataError, match="unknown preset 'huge'"):
        build(tmp_path / "x", "huge")
    assert not (tmp_path / "x").exists()
    with pytest.raises(DataError, match="seed 0.*--force"):
        build(root, "micro", seed=1)
    other_k = BuildSettings(**{**preset_settings("micro").__dict__, "clusters": 3})
    with pytest.raises(DataError, match="other settings.*--force"):
        build(root, "micro", seed=0, settings=other_k)
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
