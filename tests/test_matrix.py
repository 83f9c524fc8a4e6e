"""The batched expert x task matrix against each expert alone through plain PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from lorafuse.errors import LorafuseError
from lorafuse.matrix import LossMatrix, expert_task_matrix
from lorafuse.spec import load_spec
from lorafuse.workspace import Workspace
from tests.conftest import MINI_TASKS
from tests.evalref import reference_task_losses


def test_batched_matrix_equals_peft_one_by_one(mini_bench, tmp_path):
    ws = Workspace(load_spec(mini_bench))
    # 6 validation rows in one batch: rows_per_pass=64 puts all 3 experts in one forward
    m = expert_task_matrix(ws, "private", "validation", rows_per_pass=64)
    assert m.experts == sorted(MINI_TASKS) and m.tasks == sorted(MINI_TASKS)
    for i, e in enumerate(m.experts):
        ref = reference_task_losses(mini_bench, "validation", mini_bench / "experts/private" / e)
        for j, t in enumerate(m.tasks):
            assert m.losses[i, j].item() == pytest.approx(ref[t], abs=1e-5)
    assert m.own == {t: t for t in MINI_TASKS}
    assert m.own_index() == [m.experts.index(t) for t in m.tasks]
    m.save(tmp_path / "m.json")
    back = LossMatrix.load(tmp_path / "m.json")
    torch.testing.assert_close(back.losses, m.losses.double())


def test_cache_resumes(mini_bench, tmp_path):
    ws = Workspace(load_spec(mini_bench))
    first = expert_task_matrix(ws, "private", "test", rows_per_pass=1, cache_dir=tmp_path)
    files = sorted(tmp_path.rglob("chunk_*.pt"))
    assert len(files) == 3  # one expert per chunk
    files[1].unlink()  # as if interrupted before the second chunk was saved
    calls = []
    again = expert_task_matrix(
        ws, "private", "test", rows_per_pass=1, cache_dir=tmp_path, progress=calls.append
    )
    torch.testing.assert_close(again.losses, first.losses)
    assert len(sorted(tmp_path.rglob("chunk_*.pt"))) == 3


GOOD = {"experts": ["a", "b"], "tasks": ["t"], "losses": [[1.0], [2]], "n_examples": [3]}


def test_matrix_file_round_trip_with_base(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({**GOOD, "base": [1.5], "meta": {"x": None}}))
    m = LossMatrix.load(tmp_path / "m.json")
    assert m.losses.tolist() == [[1.0], [2.0]] and m.base == [1.5] and m.own == {}


@pytest.mark.parametrize(
    "text, said",
    [
        ('{"experts": ["a"], "tasks": ["t"], "losses": [[1, 2]]}', "'n_examples': missing"),
        (json.dumps({**GOOD, "losses": [[1.0], [2.0, 3.0]]}), "'losses': expected [1, 1]"),
        (json.dumps({**GOOD, "losses": [[1.0]]}), "'losses': expected [1, 1]"),
        (json.dumps({**GOOD, "losses": [[1.0], [float("nan")]]}), "'losses.1.0': expected a fin"),
        (json.dumps({**GOOD, "losses": [[1.0], ["2"]]}), "'losses.1.0': expected a number"),
        (json.dumps({**GOOD, "losses": [[1.0], None]}), "'losses.1': expected a list, got null"),
        (json.dumps({**GOOD, "n_examples": [-1]}), "'n_examples.0': expected a number >= 0"),
        (json.dumps({**GOOD, "n_examples": [1, 2]}), "'n_examples': expected 1 value(s)"),
        (json.dumps({**GOOD, "base": [float("inf")]}), "'base.0': expected a finite number"),
        (json.dumps({**GOOD, "base": [1.0, 2.0]}), "'base': expected 1 value(s)"),
        (json.dumps({**GOOD, "experts": "a,b"}), "'experts': expected a list"),
        (json.dumps({**GOOD, "own": {"t": 1}}), "'own.t': expected a string, got 1"),
        ("[1, 2]", "expected an object at the top level"),
        (json.dumps(GOOD)[:30], "is not valid JSON (empty or truncated?)"),
    ],
)
def test_bad_matrix_file(tmp_path, text, said):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(LorafuseError, match="matrix file") as info:
        LossMatrix.load(tmp_path / "bad.json")
    assert str(tmp_path / "bad.json") in str(info.value) and said in str(info.value)


def test_missing_matrix_file(tmp_path):
    with pytest.raises(LorafuseError, match="does not exist"):
        LossMatrix.load(tmp_path / "none.json")
