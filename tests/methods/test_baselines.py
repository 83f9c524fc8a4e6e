"""Baseline methods on the mini benchmark against plain PEFT, one example at a time."""

from __future__ import annotations

import json
import shutil

import pytest

from lorafuse.errors import LibraryMismatchError, LorafuseError
from lorafuse.methods.registry import resolve
from lorafuse.methods.run import evaluate_method
from lorafuse.spec import load_spec
from lorafuse.workspace import Workspace
from tests.conftest import MINI_TASKS
from tests.evalref import reference_task_losses


@pytest.fixture(scope="module")
def ws(mini_bench):
    return Workspace(load_spec(mini_bench))


def test_base_and_single_equal_reference(ws, mini_bench):
    base = evaluate_method(ws, "base", "test")
    ref = reference_task_losses(mini_bench, "test")
    assert base.n_tasks == 3
    for t in MINI_TASKS:
        assert base.per_task[t]["loss"] == pytest.approx(ref[t], abs=1e-5)
    single = evaluate_method(ws, "single:reverse", "validation")
    ref = reference_task_losses(mini_bench, "validation", mini_bench / "experts/private/reverse")
    for t in MINI_TASKS:
        assert single.per_task[t]["loss"] == pytest.approx(ref[t], abs=1e-5)


def test_oracle_uses_each_tasks_expert(ws, mini_bench):
    oracle = evaluate_method(ws, "oracle", "test")
    for t in MINI_TASKS:
        ref = reference_task_losses(mini_bench, "test", mini_bench / "experts/private" / t, [t])
        assert oracle.per_task[t]["loss"] == pytest.approx(ref[t], abs=1e-5)
    shared = evaluate_method(ws, "shared", "test")
    ref = reference_task_losses(mini_bench, "test", mini_bench / "experts/shared/shared")
    assert shared.mean == pytest.approx(sum(ref.values()) / 3, abs=1e-5)


def test_merges_run_and_differ(ws):
    a = evaluate_method(ws, "merge-uniform", "test", max_per_task=1)
    b = evaluate_method(ws, "merge-uniform-full", "test", max_per_task=1)
    assert all(v["n_examples"] == 1 for v in a.per_task.values())
    assert a.mean != pytest.approx(b.mean, abs=1e-7)


def test_unknown_method_and_kind(ws):
    with pytest.raises(LorafuseError, match="known methods: base, oracle"):
        resolve("ensemble-nope")
    with pytest.raises(LorafuseError, match="needs an argument"):
        resolve("single")
    with pytest.raises(LorafuseError, match="no experts of kind 'mbc'"):
        evaluate_method(ws, "oracle", "test", kind="mbc")
    with pytest.raises(LorafuseError, match="unknown expert"):
        evaluate_method(ws, "single:nobody", "test")


def test_bad_setups(mini_bench, tmp_path):
    # An expert whose base model differs from the setup's.
    bench = tmp_path / "bench"
    shutil.copytree(mini_bench, bench)
    cfg_path = bench / "experts/private/count/adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "microsoft/phi-2"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(LibraryMismatchError, match="count.*phi-2"):
        evaluate_method(Workspace(load_spec(bench)), "oracle", "test")
    # A task map naming an unknown expert, then an unknown task.
    spec = tmp_path / "spec.yaml"
    head = f"base_model: {mini_bench}/base\ndata: {mini_bench}/data\n"
    head += f"experts:\n  private: {mini_bench}/experts/private\n"
    spec.write_text(head + "task_map:\n  private: {upper: nobody}\n")
    with pytest.raises(LorafuseError, match="unknown expert"):
        evaluate_method(Workspace(load_spec(spec)), "oracle", "test")
    spec.write_text(head + "task_map:\n  private: {sing: upper}\n")
    with pytest.raises(LorafuseError, match="not in the data"):
        evaluate_method(Workspace(load_spec(spec)), "oracle", "test")
    # An empty split.
    with pytest.raises(LorafuseError, match="split"):
        evaluate_method(Workspace(load_spec(mini_bench)), "base", "dev")
