"""Generated answers scored per task: against hand computations on known answers."""

from __future__ import annotations

import math

import pytest

from lorafuse.answers import answer_prompts, score_answers, task_caps
from lorafuse.errors import LorafuseError
from lorafuse.spec import load_spec
from lorafuse.workspace import Workspace


def test_scores_are_per_task_means_then_mean_and_se_over_tasks():
    answers = ["[6]", "[7]", "yes.", "no", "cat dog"]
    refs = ["[6]", "[8]", "yes.", "no.", "cat bird dog"]
    tasks = ["a", "a", "b", "b", "c"]
    s = score_answers(answers, refs, tasks)
    # exact match per task: a 1/2, b 1/2, c 0; Rouge-L: a (1 + 0)/2, b (1 + 1)/2, c 0.8
    assert s["per_task"]["a"] == {"n_examples": 2, "exact_match": 0.5, "rouge_l": 0.5}
    assert s["per_task"]["b"]["rouge_l"] == 1.0 and s["per_task"]["c"]["exact_match"] == 0.0
    em = [0.5, 0.5, 0.0]
    assert s["exact_match"]["mean"] == pytest.approx(1 / 3)
    var = sum((x - 1 / 3) ** 2 for x in em) / 2
    assert s["exact_match"]["se"] == pytest.approx(math.sqrt(var / 3))
    assert s["rouge_l"]["mean"] == pytest.approx((0.5 + 1.0 + 0.8) / 3)
    assert s["n_tasks"] == 3
    with pytest.raises(LorafuseError, match="2 answers, 1 references"):
        score_answers(["a", "b"], ["a"], ["t", "t"])
    with pytest.raises(LorafuseError, match="no answers"):
        score_answers([], [], [])


def test_caps_come_from_the_longest_target_of_each_task(mini_bench):
    ws = Workspace(load_spec(mini_bench))
    rows = ws.examples("test")
    caps = task_caps(ws.tokenizer, rows, 64)
    for task, cap in caps.items():
        # one token per character: " " + target + EOS
        n = max(len(t) for _, t, k in rows if k == task) + 2
        assert cap == n + max(2, n // 4)
    assert task_caps(ws.tokenizer, rows, 3) == dict.fromkeys(caps, 3)
    p = answer_prompts(ws, "test", max_per_task=1)
    assert p.tasks == sorted(set(p.tasks), key=p.tasks.index) and len(p.ids) == len(caps)
    src, tgt, _ = rows[0]
    assert ws.tokenizer.decode(p.ids[0]) == src and p.references[0] == tgt
    with pytest.raises(LorafuseError, match="max_new_tokens"):
        answer_prompts(ws, "test", 1, 0)
