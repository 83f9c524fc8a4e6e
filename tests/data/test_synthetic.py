"""The synthetic suite: determinism, splits, presets, targets recomputed independently."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from lorafuse.data.errors import DataError
from lorafuse.data.families import FAMILIES, FORMATS
from lorafuse.data.synthetic import (
    PRESETS,
    Task,
    generate,
    make_tasks,
    pretraining_examples,
    select_tasks,
)


def _input(source: str) -> str:
    # Every layout puts the input last, after ": " or "\nInput: ".
    return re.split(r"\nInput: |: ", source)[-1]


def test_same_seed_same_rows_other_seed_other_rows():
    tasks = make_tasks("tiny")
    assert generate(tasks, 40, seed=3) == generate(tasks, 40, seed=3)
    assert generate(tasks, 40, seed=3) != generate(tasks, 40, seed=4)


def test_presets_sizes_and_unique_names():
    assert len(make_tasks("tiny")) == 8
    small = make_tasks("small")
    assert len(small) == 32 and len({t.family.name for t in small}) >= 8
    full = make_tasks("full")
    assert len(full) == 256 and len({t.name for t in full}) == 256
    assert all(len(f.ops) >= 6 for f in FAMILIES)
    assert set(PRESETS) >= {"tiny", "small", "full"}


def test_splits_are_disjoint_and_80_10_10():
    rows = generate(make_tasks("tiny"), 100, seed=0)
    for task in {r["task_name"] for r in rows}:
        mine = [r for r in rows if r["task_name"] == task]
        counts = Counter(r["split"] for r in mine)
        assert counts == {"train": 80, "validation": 10, "test": 10}
        by_split = {s: {r["source"] for r in mine if r["split"] == s} for s in counts}
        assert not by_split["train"] & by_split["test"]
        assert not by_split["train"] & by_split["validation"]
        assert not by_split["validation"] & by_split["test"]


def test_targets_match_an_independent_computation():
    fam = {f.name: f for f in FAMILIES}
    ops = {(f.name, o.name): o for f in FAMILIES for o in f.ops}
    fmt = {f.name: f for f in FORMATS}
    tasks = [
        Task(fam["count"], ops["count", "count_a"], fmt["plain"]),
        Task(fam["arith"], ops["arith", "sum"], fmt["plain"]),
        Task(fam["dates"], ops["dates", "year"], fmt["brackets"]),
    ]
    for row in generate(tasks, 30, seed=1):
        x = _input(row["source"])
        if row["task_name"].startswith("count_count_a"):
            assert row["target"] == str(x.count("a"))
        elif row["task_name"].startswith("arith_sum"):
            assert row["target"] == str(sum(int(d) for d in x.split(", ")))
        else:
            assert row["target"] == f"[{x[:4]}]"


def test_tasks_of_a_family_conflict_on_the_same_input():
    # Same input format, different answers: only the instruction tells tasks apart.
    tasks = make_tasks("small")
    for family in {t.family.name for t in tasks}:
        mine = [t for t in tasks if t.family.name == family]
        import random

        rng = random.Random(0)
        differ = 0
        for _ in range(20):
            _, payload = mine[0].family.draw(rng)
            differ += len({t.target(payload) for t in mine}) > 1
        assert differ >= 10, family


def test_task_is_inferable_from_the_source():
    rows = generate(make_tasks("small"), 20, seed=0)
    instruction = {}
    for r in rows:
        text = r["source"][: -len(_input(r["source"]))]
        instruction.setdefault(text, set()).add(r["task_name"])
    assert all(len(names) == 1 for names in instruction.values())


def test_pretraining_examples_are_deterministic_and_mostly_coded():
    pairs = pretraining_examples(families=4, n=400, seed=0, shuffled=0.3)
    assert pairs == pretraining_examples(families=4, n=400, seed=0, shuffled=0.3)
    coded = [s for s, _ in pairs if re.match(r"#\d\d\d ", s)]
    assert 0.6 < len(coded) / len(pairs) < 0.8


def test_bad_preset_and_task_names():
    with pytest.raises(DataError, match="unknown preset 'huge'.*tiny"):
        make_tasks("huge")
    with pytest.raises(DataError, match="unknown task.*nope"):
        select_tasks(make_tasks("tiny"), ["nope"])
    with pytest.raises(DataError, match="at least 10"):
        generate(make_tasks("tiny"), 3, seed=0)
