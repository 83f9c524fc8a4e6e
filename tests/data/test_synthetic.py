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
    # Every layout puts the input last, after ": ", "\nInput: " or "\nText: ".
    return re.split(r"\nInput: |\nText: |: ", source)[-1]


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
    tasks = make_tasks("tiny")
    rows = generate(tasks, 100, seed=0)
    share = {t.name: t.share for t in tasks}
    assert sorted(set(share.values())) == [0.08, 1.0]  # tiny has low-resource tasks
    for task in {r["task_name"] for r in rows}:
        mine = [r for r in rows if r["task_name"] == task]
        counts = Counter(r["split"] for r in mine)
        # a low-resource task has fewer training examples, full validation and test splits
        assert counts == {"train": max(1, round(80 * share[task])), "validation": 10,
                          "test": 10}  # fmt: skip
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


def test_skill_is_inferable_from_the_source():
    # The instruction tells the answer apart: a prompt's text outside its input belongs to
    # one skill (near-duplicate tasks share one template, and so their answers).
    tasks = make_tasks("small")
    skill = {t.name: t.skill for t in tasks}
    instruction = {}
    for r in generate(tasks, 20, seed=0):
        text = r["source"][: -len(_input(r["source"]))]
        instruction.setdefault(text, set()).add(skill[r["task_name"]])
    assert all(len(skills) == 1 for skills in instruction.values())
    names = {}
    for r in generate(tasks, 20, seed=0):
        names.setdefault(r["source"][: -len(_input(r["source"]))], set()).add(r["task_name"])
    assert any(len(n) == 2 for n in names.values())  # a template both sets share


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


def _payloads(family, n=30):
    import random

    rng = random.Random(1)
    return [family.draw(rng) for _ in range(n)]


def test_transfer_design_pairs_near_duplicates_and_conflicts_on_tiny():
    # tiny (transfer): families 0 and 2 hold two template sets of one skill (same answers
    # on every input, different prompts), families 1 and 3 two skills (other answers).
    tasks = make_tasks("tiny")
    by_family = {}
    for t in tasks:
        by_family.setdefault(t.family.name, []).append(t)
    dup, conflict = 0, 0
    for mine in by_family.values():
        a, b = mine
        draws = _payloads(a.family)
        same = sum(a.target(p) == b.target(p) for _, p in draws)
        if a.skill == b.skill:  # near-duplicates: one skill, two template sets
            dup += 1
            assert same == len(draws)
            assert {a.variant, b.variant} == {0, 1}
            assert all(a.source(x, 0) != b.source(x, 0) for x, _ in draws)
            assert (a.op.fn, a.format) == (b.op.fn, b.format)
        else:  # conflicting: the same inputs, other answers
            conflict += 1
            assert same <= len(draws) // 2, (a.name, b.name)
    assert (dup, conflict) == (2, 2)


def test_transfer_design_on_small():
    tasks = make_tasks("small")
    skills = Counter(t.skill for t in tasks)
    assert set(skills.values()) == {2} and len(skills) == 16  # 16 skills, two sets each
    low = [t for t in tasks if t.share < 1]
    assert len(low) == 8 and all(t.variant == 1 for t in low)  # one per family
    assert len({t.family.name for t in low}) == 8
    interference = make_tasks("small-interference")
    assert len({t.skill for t in interference}) == 32  # today's design: one task per skill
    assert all(t.variant == 0 and t.share == 1 for t in interference)
