"""The study end to end on the micro benchmark: schema, caching, failures, subsets."""

from __future__ import annotations

import json
import math

import pytest

from lorafuse.errors import LorafuseError
from lorafuse.study.config import MethodConfig, preset_config
from lorafuse.study.runner import RESULTS, StudyRun, run_study


def micro(tmp_path, methods=None, **update):
    cfg = preset_config("micro")
    build = cfg.build.model_copy(update={"out": str(tmp_path / "bench")})
    cfg = cfg.model_copy(update={"build": build, **update})
    if methods is not None:
        cfg = cfg.model_copy(update={"methods": [MethodConfig(name=m) for m in methods]})
    return cfg


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    cfg = micro(root)
    bad = MethodConfig(name="single:no-such-expert")  # fails at evaluation
    cfg = cfg.model_copy(update={"methods": [*cfg.methods, bad]})
    out = root / "out"
    return cfg, out, run_study(StudyRun(cfg, out))


def test_results_schema_and_finite_losses(study):
    cfg, out, results = study
    on_disk = json.loads((out / RESULTS).read_text())
    assert on_disk["format"] == "lorafuse-study/1" and on_disk["methods"] == results["methods"]
    by = {(m["name"], m["experts"]): m for m in results["methods"]}
    assert len(by) == len(cfg.methods)
    tasks = results["library"]["tasks"]
    for (name, kind), m in by.items():
        if name.startswith("single:"):
            continue
        assert m["status"] == "ok", (name, kind, m.get("error"))
        assert math.isfinite(m["mean"]) and m["se"] >= 0
        assert sorted(m["per_task"]) == sorted(tasks)
        assert m["mean"] == pytest.approx(sum(m["per_task"].values()) / len(tasks))
        assert m["cost"]["passes"] >= 1 and m["cost"]["relative_flops"] >= 1
        answers = m["answers"]  # generated answers, scored per task like the loss
        assert sorted(answers["per_task"]) == sorted(tasks)
        em = [v["exact_match"] for v in answers["per_task"].values()]
        assert answers["exact_match"]["mean"] == pytest.approx(sum(em) / len(tasks))
        assert all(0 <= x <= 1 for x in em) and m["seconds"]["answers"] >= 0
        assert answers["settings"]["examples"] == 3 * len(tasks)  # the micro test cap
    # fitted methods point to their fits; ensembles were scored from the cached passes
    assert by[("ensemble-exact", "mbc")]["fit"]["weights"]
    assert by[("ensemble-exact", "mbc")]["settings"]["from_cache"]
    assert by[("oracle", "private")]["status"] == "ok"  # Figure 4's other side
    # every SGD fit says how it ended; a top-k variant carries its parent's fit
    fitted = [("ensemble-sgd", "mbc"), ("ensemble-distill", "mbc"), ("merge-sgd-layer", "mbc"),
              ("route-sgd", "mbc"), ("route-hc", "private")]  # fmt: skip
    for name, kind in fitted:
        fit = by[(name, kind)]["fit"]
        assert 1 <= fit["steps"] <= 2 and fit["stop"] in ("plateau", "step cap"), name
        assert fit["converged"] is (fit["stop"] == "plateau")
        assert fit["validation_loss"] <= fit["final_validation_loss"]
        assert 1 <= fit["best_step"] <= fit["steps"]
    assert by[("route-sgd-top1", "mbc")]["fit"] == by[("route-sgd", "mbc")]["fit"]
    for name in ("report.md", "report.html"):
        assert (out / name).is_file()
    for fig in results["figures"].values():
        assert (out / fig).is_file()
    a = results["analyses"]
    assert a["clusters"]["k"] == 2 and sum(len(c) for c in a["clusters"]["clusters"]) == 4
    assert a["connectivity"]["curves"] and a["greedy"]["n_experts"] == 4  # the private experts


def test_a_failing_method_is_reported_and_the_others_complete(study):
    _, _, results = study
    bad = [m for m in results["methods"] if m["status"] == "failed"]
    assert [m["name"] for m in bad] == ["single:no-such-expert"]
    assert "no-such-expert" in bad[0]["error"]


def test_a_rerun_reuses_every_stage_and_gives_the_same_numbers(study):
    cfg, out, first = study
    again = run_study(StudyRun(cfg, out))
    assert all(s["cached"] for k, s in again["stages"].items() if k != "build")
    assert [m.get("mean") for m in again["methods"]] == [m.get("mean") for m in first["methods"]]


def test_answers_follow_the_generation_setting(study):
    cfg, out, _ = study
    fewer = cfg.model_copy(update={"generation": cfg.generation.model_copy(update={"examples": 1})})
    again = run_study(StudyRun(fewer, out, methods=["base"]))
    assert again["stages"]["eval:base@mbc"]["cached"]
    assert not again["stages"]["answers:base@mbc"]["cached"]
    assert again["methods"][0]["answers"]["settings"]["examples"] == len(again["library"]["tasks"])
    off = run_study(StudyRun(cfg.model_copy(update={"generation": None}), out, methods=["base"]))
    assert "answers" not in off["methods"][0]
    assert off["claims"][0]["exact_match"]["verdict"] == "not measured"


def test_a_changed_setting_reruns_only_what_depends_on_it(study, tmp_path):
    cfg, out, _ = study
    steps = {**cfg.fit_defaults, "max_steps": 1}
    changed = cfg.model_copy(update={"fit_defaults": steps})
    again = run_study(StudyRun(changed, out, methods=["base", "merge-sgd-global"]))
    assert again["stages"]["eval:base@mbc"]["cached"]
    assert not again["stages"]["fit:merge-sgd-global@mbc"]["cached"]
    assert [m["name"] for m in again["methods"]] == ["base", "merge-sgd-global"]


def test_bad_subset_and_cap(study):
    cfg, out, _ = study
    with pytest.raises(LorafuseError, match="not in the study config"):
        run_study(StudyRun(cfg, out, methods=["route-magic"]))
    with pytest.raises(LorafuseError, match="max-examples-per-task must be >= 1"):
        run_study(StudyRun(cfg, out, max_examples_per_task=0))


def test_a_student_is_refitted_after_its_teacher_wherever_the_teacher_is_listed(study):
    cfg, out, _ = study
    others = [m for m in cfg.methods if m.name != "ensemble-sgd"]
    teacher = MethodConfig(name="ensemble-sgd", options={"lr_grid": [0.05]})
    changed = cfg.model_copy(update={"methods": [*others, teacher]})  # listed after distill
    again = run_study(StudyRun(changed, out, methods=["ensemble-distill"]))
    (student,) = again["methods"]
    assert student["status"] == "ok", student.get("error")
    assert not again["stages"]["fit:ensemble-sgd@mbc"]["cached"]  # changed: fitted first
    assert not again["stages"]["fit:ensemble-distill@mbc"]["cached"]  # its teacher changed
    fits = out / "fits"
    sgd = json.loads((fits / "ensemble-sgd__mbc.json").read_text())
    distill = json.loads((fits / "ensemble-distill__mbc.json").read_text())
    assert sgd["lr"] == 0.05 and distill["teacher"] == "ensemble-sgd"
    assert distill["teacher_weights"] == pytest.approx(sgd["weights"])
