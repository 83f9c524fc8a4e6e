"""The lm-evaluation-harness backend against lorafuse's own evaluation, offline.

The tests write lm-eval task YAMLs over local jsonl files made from the mini benchmark:
a multiple-choice task over the label set of one task (each choice ends with the
end-of-sequence token, as lorafuse's targets do, so the gold choice's log-likelihood is
exactly minus lorafuse's summed target NLL) and a generate_until task. Each method family
runs through lm-eval and its numbers are checked against lorafuse's own.
"""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("lm_eval")

from lorafuse.methods.run import evaluate_method, fit_method, generate_text  # noqa: E402
from lorafuse.spec import load_spec  # noqa: E402
from lorafuse.workspace import Workspace  # noqa: E402

TASK = "upper"
CAP = 3  # new tokens: below every task's own cap, so both sides decode the same length
EOS = "</s>"


@pytest.fixture(scope="module")
def setup(mini_bench, tmp_path_factory):
    """A copy of the mini benchmark with route-sgd fitted, and the two lm-eval tasks."""
    root = tmp_path_factory.mktemp("harness")
    bench = root / "bench"
    shutil.copytree(mini_bench, bench)
    ws = Workspace(load_spec(bench))
    fit_method(ws, "route-sgd", "private", {"max_steps": 2, "epochs": None, "lr_grid": [0.01]})
    rows = [(s, t) for s, t, k in ws.examples("train") if k == TASK]
    labels = sorted({t for s, t, k in ws.examples("validation") + ws.examples("train")
                     if k == TASK})  # fmt: skip
    data = root / "data.jsonl"
    with data.open("w") as f:
        for s, t in rows:
            choices = [f"{c}{EOS}" for c in labels]
            f.write(json.dumps({"source": s, "target": t, "choices": choices,
                                "gold": labels.index(t)}) + "\n")  # fmt: skip
    tasks = root / "tasks"
    tasks.mkdir()
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\ndoc_to_text: source\n"
    )
    (tasks / "mc.yaml").write_text(
        "task: lf_mc\n" + common + "output_type: multiple_choice\ndoc_to_choice: choices\n"
        "doc_to_target: gold\ntarget_delimiter: ' '\nmetric_list:\n  - metric: acc\n"
    )
    (tasks / "gen.yaml").write_text(
        "task: lf_gen\n" + common + "output_type: generate_until\ndoc_to_target: target\n"
        f"generation_kwargs:\n  until: ['{EOS}']\n  max_gen_toks: {CAP}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return ws, bench, tasks, rows


FAMILIES = ["oracle", "ensemble-uniform", "ensemble-uniform-logits", "merge-uniform", "route-sgd"]


@pytest.mark.parametrize("method", FAMILIES)
def test_backend_numbers_equal_lorafuses_own(setup, method):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lorafuse.harness import LorafuseLM

    ws, bench, tasks, rows = setup
    lm = LorafuseLM(library=str(bench), method=method, task=TASK, batch_size=4)
    try:
        out = simple_evaluate(
            model=lm, tasks=["lf_mc", "lf_gen"], log_samples=True,
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        )  # fmt: skip
    finally:
        lm.close()
    # multiple choice: the gold choice's log-likelihood is lorafuse's target NLL, per token
    mc = sorted(out["samples"]["lf_mc"], key=lambda s: s["doc_id"])
    per_example = []
    for s in mc:
        ll, _ = s["resps"][s["target"]][0]
        n_tokens = len(ws.tokenizer(" " + s["doc"]["target"])["input_ids"]) + 1  # + EOS
        per_example.append(-float(ll) / n_tokens)
    own = evaluate_method(ws, method, "train", "private")  # the same examples of TASK
    assert own.per_task[TASK]["n_examples"] == len(mc) == len(rows)
    assert sum(per_example) / len(mc) == pytest.approx(own.per_task[TASK]["loss"], abs=1e-4)
    assert 0 <= out["results"]["lf_mc"]["acc,none"] <= 1
    # generate_until: each answer is lorafuse's greedy answer to the same prompt
    gen = sorted(out["samples"]["lf_gen"], key=lambda s: s["doc_id"])
    prompts = [s["doc"]["source"] for s in gen]
    mine = generate_text(ws, method, prompts, "private", task=TASK, max_new_tokens=CAP)
    assert [s["resps"][0][0].strip() for s in gen] == mine
    assert "exact_match,none" in out["results"]["lf_gen"]


def test_rolling_loglikelihood_and_registration(setup):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from lorafuse.errors import LorafuseError
    from lorafuse.harness import LorafuseLM, register

    ws, bench, _, rows = setup
    assert register() is LorafuseLM and get_model("lorafuse") is LorafuseLM
    assert register() is LorafuseLM  # twice is fine
    lm = LorafuseLM.create_from_arg_string(f"library={bench},method=merge-uniform,batch_size=2")
    try:
        text = rows[0][0] + " " + rows[0][1]
        rolling = Instance("loglikelihood_rolling", {}, (text,), 0)
        empty = Instance("loglikelihood", {}, ("", text), 0)
        (r,) = lm.loglikelihood_rolling([rolling])
        ((ll, _),) = lm.loglikelihood([empty])  # one window: the same tokens scored
        assert r == pytest.approx(ll, abs=1e-5) and r < 0
        sampled = Instance("generate_until", {}, ("x", {"do_sample": True}), 0)
        with pytest.raises(LorafuseError, match="greedily"):
            lm.generate_until([sampled])
    finally:
        lm.close()
    with pytest.raises(LorafuseError, match="max_new_tokens"):
        LorafuseLM(library=str(bench), method="base", max_new_tokens=0)
