"""Every method family generates: answers scored per task, the oracle as its experts."""

from __future__ import annotations

import pytest

from lorafuse.errors import LorafuseError
from lorafuse.methods.run import generate_answers, generate_text
from tests.conftest import MINI_TASKS


@pytest.mark.parametrize(
    "name", ["base", "shared", "merge-uniform", "arrow-top1", "ensemble-uniform-logits"]
)
def test_generate_answers_scores_every_task(ws, name):
    r = generate_answers(ws, name, "test", "private", max_per_task=2, max_new_tokens=6)
    assert set(r["per_task"]) == set(MINI_TASKS) and r["n_tasks"] == 3
    for metric in ("exact_match", "rouge_l"):
        values = [v[metric] for v in r["per_task"].values()]
        assert r[metric]["mean"] == pytest.approx(sum(values) / 3)
        assert all(0 <= v <= 1 for v in values)
    assert r["settings"]["examples"] == 6 and r["settings"]["max_new_tokens"] == 6
    assert set(r["samples"]) == set(MINI_TASKS)


def test_the_oracle_answers_as_each_tasks_expert(ws):
    prompts = [s for s, _, t in ws.examples("test") if t == "reverse"]
    oracle = generate_text(ws, "oracle", prompts, "private", task="reverse", max_new_tokens=5)
    alone = generate_text(ws, "single:reverse", prompts, "private", max_new_tokens=5)
    assert oracle == alone
    other = generate_text(ws, "single:upper", prompts, "private", max_new_tokens=5)
    assert other != alone  # random experts answer differently: the check has teeth


def test_generate_text_refuses_bad_input(ws):
    with pytest.raises(LorafuseError, match="give one of its tasks: count, reverse, upper"):
        generate_text(ws, "oracle", ["upper: cat"], "private")
    with pytest.raises(LorafuseError, match="max_new_tokens"):
        generate_text(ws, "base", ["upper: cat"], "private", max_new_tokens=0)
    with pytest.raises(LorafuseError, match="no token"):
        generate_text(ws, "base", [""], "private")
    with pytest.raises(LorafuseError, match="unknown method"):
        generate_text(ws, "nope", ["x"], "private")
