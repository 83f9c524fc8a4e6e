"""Two studies claim by claim: verdicts, numbers, the regime column, labels and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorafuse.errors import LorafuseError
from lorafuse.study.claims import FAILS, HOLDS, MISSING, TABLE, claims
from lorafuse.study.compare import DIFFERS, NOT_COMPARABLE, SAME, compare, write_compare
from lorafuse.study.seeds import MIXED, add_seeds

TASKS = [f"t{i}" for i in range(10)]
CLAIM = {c.id: c.claim for c in TABLE}
MERGE, PROBS, LOWRANK = CLAIM[8], CLAIM[9], CLAIM[10]  # global vs layer, probs vs logits, B.2


def _methods(global_minus_layer: float, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    level = rng.normal(1.0, 0.2, len(TASKS))  # (T,)
    shifts = {"merge-sgd-global": global_minus_layer, "merge-sgd-layer": 0.0,
              "ensemble-uniform": -0.2, "ensemble-uniform-logits": 0.0}  # fmt: skip
    out = []
    for name, shift in shifts.items():
        losses = level + shift + rng.normal(0.0, 0.01, len(TASKS))  # (T,)
        out.append({
            "name": name, "family": "merging", "experts": "private", "status": "ok",
            "mean": float(losses.mean()), "se": float(losses.std(ddof=1) / np.sqrt(len(TASKS))),
            "per_task": dict(zip(TASKS, map(float, losses))),
        })  # fmt: skip
    return out


def _study(folder, name, methods, structure=None, seeds=None) -> dict:
    results = {"format": "lorafuse-study/1", "config": {"name": name, "seed": 0},
               "library": {"structure": structure}, "methods": methods}  # fmt: skip
    results["claims"] = claims(results)
    if seeds:  # {seed: methods}
        results["config"]["seeds"] = list(seeds)
        add_seeds(results, {k: {"methods": v, "stages": {}} for k, v in seeds.items()}, False)
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return results


@pytest.fixture
def two(tmp_path):
    a = _study(tmp_path / "a", "small", _methods(-0.1, 0))
    b_methods = _methods(+0.1, 1)
    seeds = {0: b_methods, 1: _methods(-0.1, 2)}  # global merging wins on seed 1 only
    b = _study(tmp_path / "b", "small-interference", b_methods,
               {"not_best_share": 0.3, "greedy_share": 0.6125, "experts": 40}, seeds)  # fmt: skip
    return tmp_path, a, b


def _row(comparison, claim):
    return next(r for r in comparison["rows"] if r["claim"] == claim)


def test_verdicts_numbers_and_the_regime_column(two):
    root, a, b = two
    c = compare(a, b, ("a", "b"))
    merge, probs, lowrank = (_row(c, x) for x in (MERGE, PROBS, LOWRANK))
    assert merge["verdicts"] == [HOLDS, MIXED] and merge["regime"] == DIFFERS  # b: robust
    assert merge["seed_verdicts"] == [None, {"0": FAILS, "1": HOLDS}]
    assert probs["verdicts"] == [HOLDS, HOLDS] and probs["regime"] == SAME
    assert lowrank["verdicts"] == [MISSING, MISSING] and lowrank["regime"] == NOT_COMPARABLE
    for results, text in zip((a, b), merge["numbers"]):  # the (first seed's) paired diff
        m = {x["name"]: x["per_task"] for x in results["methods"]}
        d = np.array([m["merge-sgd-global"][t] - m["merge-sgd-layer"][t] for t in TASKS])
        se = d.std(ddof=1) / np.sqrt(len(d))
        assert text == f"merge-sgd-global - merge-sgd-layer = {d.mean():+.3f} ± {se:.3f}"
    assert len(c["rows"]) == len(a["claims"])
    assert sum(c["counts"].values()) == len(c["rows"]) and c["counts"][DIFFERS] >= 1


def test_written_files_label_each_study(two):
    root, a, b = two
    written = write_compare(root / "a", root / "b", root / "regimes")
    on_disk = json.loads((root / "regimes" / "compare.json").read_text())
    assert on_disk == json.loads(json.dumps(written["comparison"]))
    sa, sb = on_disk["studies"]
    assert (sa["name"], sa["not_best_share"], sa["greedy_share"]) == ("small", None, None)
    assert (sb["name"], sb["not_best_share"], sb["seeds"]) == ("small-interference", 0.3, [0, 1])
    md = (root / "regimes" / "compare.md").read_text()
    assert "| small | " in md and "| small-interference | " in md
    assert "| - | - |" in md and "30% | 61%" in md  # a has no structure statistics
    assert f"| {MERGE} | holds |" in md and "mixed (robust; seeds 0: does not hold, 1: holds)" in md
    assert "| differs |" in md and "| same verdict |" in md and "| not comparable |" in md
    assert not [p for p in (root / "regimes").iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: None, "is not a folder"),
        (lambda p: p.mkdir(), "is not a finished study: it has no results.json"),
        (lambda p: (p.mkdir(), (p / "results.json").write_text("{bad")), "is not valid JSON"),
        (lambda p: (p.mkdir(), (p / "results.json").write_text('{"format": "x"}')),
         "is not a lorafuse study's results"),
        (lambda p: (p.mkdir(), (p / "results.json").write_text('{"format": "lorafuse-study/1"}')),
         "has no claims"),
    ],
)  # fmt: skip
def test_a_folder_that_is_not_a_finished_study(two, make, needle):
    root, _, _ = two
    bad = root / "bad"
    make(bad)
    with pytest.raises(LorafuseError, match=needle) as e:
        write_compare(root / "a", bad, root / "regimes")
    assert str(bad) in str(e.value) and "--out" in str(e.value)  # the folder and the fix
    assert not (root / "regimes").exists()  # nothing written
