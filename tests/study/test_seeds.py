"""Verdicts across seeds: the robust rule, per-seed claims, and a two-seed micro study
(numbers per seed, seeded fits differ, unseeded stages shared, a rerun fully cached)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorafuse.errors import LorafuseError
from lorafuse.study.claims import FAILS, HOLDS, MISSING, TABLE, UNSURE
from lorafuse.study.config import Analyses, MethodConfig, load_config, preset_config, with_seeds
from lorafuse.study.runner import RESULTS, StudyRun, run_study
from lorafuse.study.seeds import MIXED, add_seeds, combine, robust

TASKS = [f"t{i}" for i in range(8)]


@pytest.mark.parametrize(
    "verdicts, expected",
    [
        ([HOLDS, HOLDS, HOLDS], HOLDS),
        ([HOLDS], HOLDS),
        ([FAILS, FAILS], FAILS),
        ([FAILS, UNSURE], FAILS),  # inconclusive counts as not holding
        ([UNSURE, UNSURE], FAILS),
        ([HOLDS, UNSURE], MIXED),
        ([HOLDS, FAILS, HOLDS], MIXED),
        ([HOLDS, MISSING], MIXED),
        ([FAILS, MISSING], FAILS),
        ([MISSING, MISSING], MISSING),
        ([], MISSING),
    ],
)
def test_robust_rule(verdicts, expected):
    assert robust(verdicts) == expected


def test_combine_matches_claims_by_text_and_fills_missing_seeds():
    per_seed = {
        "0": [{"claim": "a", "paper": "p", "verdict": HOLDS}, {"claim": "b", "verdict": FAILS}],
        "1": [{"claim": "b", "verdict": UNSURE}],
    }
    rows = combine(per_seed)
    assert [r["claim"] for r in rows] == ["a", "b"]
    assert rows[0]["verdicts"] == {"0": HOLDS, "1": MISSING} and rows[0]["verdict"] == MIXED
    assert rows[1]["verdicts"] == {"0": FAILS, "1": UNSURE} and rows[1]["verdict"] == FAILS


def _method(name: str, losses, family: str = "merging") -> dict:
    losses = np.asarray(losses, dtype=float)
    return {
        "name": name,
        "family": family,
        "experts": "private",
        "status": "ok",
        "mean": float(losses.mean()),
        "se": float(losses.std(ddof=1) / np.sqrt(len(losses))),
        "per_task": dict(zip(TASKS, map(float, losses))),
    }


def test_per_seed_claims_and_robust_verdicts_on_hand_made_results():
    rng = np.random.default_rng(0)
    level = rng.normal(1.0, 0.2, len(TASKS))  # (T,) task difficulty shared by every method
    noise = 0.01

    def run(global_minus_layer: float) -> dict:
        def m(name, shift, family="merging"):
            losses = level + shift + rng.normal(0, noise, len(TASKS))
            return _method(name, losses, family)

        methods = [m("merge-sgd-global", global_minus_layer), m("merge-sgd-layer", 0.0)]
        methods += [m("ensemble-uniform", -0.2, "ensembling")]
        methods += [m("ensemble-uniform-logits", 0.0, "ensembling")]
        return {"methods": methods, "stages": {}}

    runs = {0: run(-0.1), 1: run(+0.1), 2: run(-0.1)}  # global merging wins on seeds 0 and 2 only
    results = {"config": {"name": "x", "seeds": [0, 1, 2]}, "methods": runs[0]["methods"]}
    add_seeds(results, runs, per_build=False)
    assert list(results["seeds"]) == ["0", "1", "2"]
    by_claim = {r["claim"]: r for r in results["robust_claims"]}
    claim = {c.id: c.claim for c in TABLE}
    merge = by_claim[claim[8]]
    assert merge["verdicts"] == {"0": HOLDS, "1": FAILS, "2": HOLDS} and merge["verdict"] == MIXED
    probs = by_claim[claim[9]]
    assert probs["verdicts"] == {"0": HOLDS, "1": HOLDS, "2": HOLDS} and probs["verdict"] == HOLDS
    for entry in results["seeds"].values():  # each seed's claims are its own numbers
        row = next(r for r in entry["claims"] if r["claim"] == merge["claim"])
        d = [entry["methods"][0]["per_task"][t] - entry["methods"][1]["per_task"][t] for t in TASKS]
        assert row["numbers"]["comparisons"][0]["diff"] == pytest.approx(np.mean(d))
        assert row["numbers"]["comparisons"][0]["se"] == pytest.approx(
            np.std(d, ddof=1) / np.sqrt(len(d))
        )
    for row in results["robust_claims"]:
        assert row["verdict"] == robust(row["verdicts"].values())


@pytest.mark.parametrize(
    "text, needle",
    [
        ("seeds: [0, 0]\n", "seeds must be distinct"),
        ("seeds: []\n", "at least one seed"),
        ("seeds: [a]\n", "'seeds.0' (line 3)"),
        ("build_per_seed: true\n", "build_per_seed needs a `build:` entry"),
    ],
)
def test_seed_options_are_validated(tmp_path, text, needle):
    path = tmp_path / "study.yaml"
    path.write_text("library: bench\nmethods: [base]\n" + text)
    with pytest.raises(LorafuseError, match="study.yaml") as e:
        load_config(path)
    assert needle in str(e.value)


def test_seed_list_and_per_seed_build_folders(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("seed: 3\nbuild: {preset: micro, out: b}\nmethods: [base]\n")
    cfg = load_config(path)
    assert cfg.seed_list() == [3] and cfg.library_path() == tmp_path / "b"
    cfg = with_seeds(cfg, [1, 2]).model_copy(update={"build_per_seed": True})
    assert cfg.library_path(2) == tmp_path / "b-seed2"
    assert cfg.library_path() == tmp_path / "b-seed1"
    with pytest.raises(LorafuseError, match="--seeds: .*distinct"):
        with_seeds(cfg, [1, 1])


# ---- a two-seed micro study ----------------------------------------------------------------
METHODS = ["base", "merge-uniform", "ensemble-uniform", "ensemble-sgd", "ensemble-distill",
           "route-sgd"]  # fmt: skip


def _micro(root, seeds, **update):
    cfg = preset_config("micro")
    cfg = cfg.model_copy(update={
        "build": cfg.build.model_copy(update={"out": str(root)}),
        "methods": [MethodConfig(name=m) for m in METHODS],
        "analyses": Analyses(connectivity=None, greedy=False),
        **update,
    })  # fmt: skip
    return with_seeds(cfg, seeds)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("seeds")


@pytest.fixture(scope="module")
def two_seeds(root):
    # built into bench-seed0, which the per-seed build below reuses as its seed-0 build
    cfg = _micro(root / "bench-seed0", [0, 1])
    out = root / "out"
    return cfg, out, run_study(StudyRun(cfg, out))


def _by(methods):
    return {(m["name"], m["experts"]): m for m in methods}


def test_each_seed_has_its_numbers_and_claims(two_seeds):
    _, out, results = two_seeds
    assert json.loads((out / RESULTS).read_text())["seeds"] == results["seeds"]
    assert list(results["seeds"]) == ["0", "1"]
    assert results["methods"] == results["seeds"]["0"]["methods"]  # the first seed on top
    assert results["claims"] == results["seeds"]["0"]["claims"]
    for seed, entry in results["seeds"].items():
        for m in entry["methods"]:
            assert m["status"] == "ok", (seed, m["name"], m.get("error"))
            assert sorted(m["per_task"]) == sorted(results["library"]["tasks"])
            assert m["mean"] == pytest.approx(np.mean(list(m["per_task"].values())))
            assert m["settings"]["seed"] == int(seed)
        assert entry["claims"] and all("verdict" in r for r in entry["claims"])
    for row in results["robust_claims"]:
        assert set(row["verdicts"]) == {"0", "1"}
        assert row["verdict"] == robust(row["verdicts"].values())


def test_seeded_fits_differ_and_unseeded_stages_are_shared(two_seeds):
    _, out, results = two_seeds
    s0, s1 = (_by(results["seeds"][k]["methods"]) for k in ("0", "1"))
    distill = ("ensemble-distill", "mbc")  # its adapter's initialisation is seeded
    assert s0[distill]["per_task"] != s1[distill]["per_task"]
    assert s0[("base", "mbc")]["per_task"] == s1[("base", "mbc")]["per_task"]
    stages = results["seeds"]["1"]["stages"]
    assert stages["eval:base@mbc"]["cached"]  # served from seed 0's cache
    assert not (out / "seeds" / "1" / "stages" / "eval_base@mbc.json").exists()
    assert not stages["fit:ensemble-distill@mbc"]["cached"]
    assert (out / "seeds" / "1" / "stages" / "fit_ensemble-distill@mbc.json").is_file()
    assert list((out / "seeds" / "1" / "fits").glob("ensemble-distill*"))
    assert "build" not in stages and "analysis:clusters" not in stages  # once, on seed 0


def test_a_rerun_is_served_from_the_cache(two_seeds):
    cfg, out, first = two_seeds
    again = run_study(StudyRun(cfg, out))
    for seed, entry in again["seeds"].items():
        assert all(s["cached"] for s in entry["stages"].values()), seed
        means = [m["mean"] for m in entry["methods"]]
        assert means == [m["mean"] for m in first["seeds"][seed]["methods"]]


def test_the_report_shows_each_seed_and_the_robust_verdict(two_seeds):
    _, out, results = two_seeds
    md = (out / "report.md").read_text()
    assert "| seed 0 | seed 1 | robust |" in md
    assert "Robust verdict: holds if the claim holds on every seed" in md
    assert "Test loss ± se on each seed" in md
    assert "fits on seeds 0, 1" in md
    for row in results["robust_claims"]:
        assert row["claim"] in md


def test_one_seed_keeps_the_single_seed_layout(root, two_seeds):
    cfg, _, _ = two_seeds
    one = cfg.model_copy(update={"seeds": None, "methods": cfg.methods[:1]})
    results = run_study(StudyRun(one, root / "one"))
    assert "seeds" not in results and "robust_claims" not in results
    assert not (root / "one" / "seeds").exists()
    assert "robust" not in (root / "one" / "report.md").read_text()


def test_one_build_per_seed(root, two_seeds):
    cfg = _micro(root / "bench", [0, 1], build_per_seed=True)
    cfg = cfg.model_copy(update={"methods": [MethodConfig(name="base")]})
    results = run_study(StudyRun(cfg, root / "per-build"))
    assert results["stages"]["build"]["cached"]  # bench-seed0: the build above, reused
    entry = results["seeds"]["1"]
    assert not entry["stages"]["build"]["cached"] and (root / "bench-seed1").is_dir()
    assert entry["library"]["seed"] == 1 and results["library"]["seed"] == 0
    assert entry["analyses"]["clusters"]["clusters"]  # analysed on its own library
    figure = entry["figures"]["clusters"]
    assert figure.startswith("seeds/1/") and (root / "per-build" / figure).is_file()
    base0, base1 = results["methods"][0], entry["methods"][0]
    assert base0["per_task"] != base1["per_task"]  # another base model, another data set
