"""Two or more studies claim by claim: verdicts, numbers, the regime column, labels (preset,
design, off-task ratios) and errors."""

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
    c = compare([a, b], ("a", "b"))
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
    written = write_compare([root / "a", root / "b"], root / "regimes")
    on_disk = json.loads((root / "regimes" / "compare.json").read_text())
    assert on_disk == json.loads(json.dumps(written["comparison"]))
    sa, sb = on_disk["studies"]
    assert (sa["name"], sa["not_best_share"], sa["greedy_share"]) == ("small", None, None)
    assert (sb["name"], sb["not_best_share"], sb["seeds"]) == ("small-interference", 0.3, [0, 1])
    md = (root / "regimes" / "compare.md").read_text()
    assert "| small | " in md and "| small-interference | " in md
    assert "| - | - | - |" in md and "30% | 61% | - |" in md  # a: no structure statistics
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
        write_compare([root / "a", bad], root / "regimes")
    assert str(bad) in str(e.value) and "--out" in str(e.value)  # the folder and the fix
    assert not (root / "regimes").exists()  # nothing written


def _hand_study(folder, name: str, verdicts: dict[str, str], library: dict | None = None) -> dict:
    """A results.json with hand-made claim rows {claim: verdict} (one comparison each)."""
    rows = [
        {"claim": claim, "paper": f"p {claim}", "verdict": v, "evidence": "e",
         "numbers": {"comparisons": [{"a": "A", "b": "B", "diff": -0.25, "se": 0.05,
                                      "n_tasks": 4, "verdict": v}], "missing": []}}
        for claim, v in verdicts.items()
    ]  # fmt: skip
    results = {"format": "lorafuse-study/1", "config": {"name": name, "seed": 0},
               "library": library or {}, "methods": [], "claims": rows}  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return results


def _library(preset: str, ratio: float | None, mbc: float | None = None) -> dict:
    kinds = {"private": {"ratio": ratio}} | ({"mbc": {"ratio": mbc}} if mbc else {})
    structure = {"not_best_share": 0.19, "greedy_share": 0.62, "off_task_ratio": ratio,
                 "kinds": kinds}  # fmt: skip
    return {"preset": preset, "structure": structure}


@pytest.fixture
def three(tmp_path):
    """transfer, interference, replay: "same" holds in all three, "odd" fails in the
    interference study only, "gone" is not in the replay study's results at all."""
    studies = {
        "transfer": ({"same": HOLDS, "odd": HOLDS, "gone": HOLDS},
                     _library("small-transfer", 2.8, 1.5)),
        "interference": ({"same": HOLDS, "odd": FAILS, "gone": FAILS},
                         {"preset": "small-interference",  # an older build: no ratios
                          "structure": {"not_best_share": 0.0, "greedy_share": 1.0}}),
        "replay": ({"same": HOLDS, "odd": HOLDS}, _library("small", 1.04)),
    }  # fmt: skip
    for name, (verdicts, library) in studies.items():
        _hand_study(tmp_path / name, name, verdicts, library)
    return tmp_path, [tmp_path / name for name in studies]


def test_three_studies_one_column_each_and_the_regime(three):
    root, folders = three
    written = write_compare(folders, root / "regimes")
    c = json.loads((root / "regimes" / "compare.json").read_text())
    assert c == json.loads(json.dumps(written["comparison"]))
    assert c["format"] == "lorafuse-compare/2" and len(c["studies"]) == 3
    rows = {r["claim"]: r for r in c["rows"]}
    assert list(rows) == ["same", "odd", "gone"]  # the first study's order
    assert rows["same"]["verdicts"] == [HOLDS] * 3 and rows["same"]["regime"] == SAME
    assert rows["odd"]["verdicts"] == [HOLDS, FAILS, HOLDS] and rows["odd"]["regime"] == DIFFERS
    assert rows["gone"]["verdicts"] == [HOLDS, FAILS, MISSING]
    assert rows["gone"]["regime"] == NOT_COMPARABLE and rows["gone"]["numbers"][2] == "-"
    assert c["counts"] == {SAME: 1, DIFFERS: 1, NOT_COMPARABLE: 1}
    md = (root / "regimes" / "compare.md").read_text()
    assert "Which regime decides the winner: transfer vs interference vs replay" in md
    n = "A - B = -0.250 ± 0.050"
    assert f"| odd | holds | {n} | does not hold | {n} | holds | {n} | differs |" in md
    assert f"| gone | holds | {n} | does not hold | {n} | not measured | - | not comparable |" in md
    assert "same verdict: 1, differs: 1, not comparable: 1" in md


def test_the_label_table_shows_preset_design_and_off_task_ratios(three):
    root, folders = three
    c = write_compare(folders, root / "regimes")["comparison"]
    t, i, r = c["studies"]
    assert (t["preset"], t["design"], t["off_task_ratio"], t["mbc_off_task_ratio"]) == (
        "small-transfer", "transfer", 2.8, 1.5)  # fmt: skip
    assert (i["design"], i["off_task_ratio"], i["mbc_off_task_ratio"]) == (
        "interference", None, None)  # fmt: skip
    assert (r["design"], r["off_task_ratio"], r["mbc_off_task_ratio"]) == ("replay", 1.04, None)
    md = (root / "regimes" / "compare.md").read_text()
    label = {line.split(" | ")[0].strip("| "): line for line in md.splitlines()}
    transfer = label["transfer"]
    assert "| small-transfer (transfer) |" in transfer and "| 2.80 (mbc 1.50) |" in transfer
    assert "| small-interference (interference) |" in label["interference"]
    assert "| 0% | 100% | - |" in label["interference"]  # no ratio recorded: '-'
    assert "| small (replay) |" in label["replay"] and "| 1.04 |" in label["replay"]


def test_the_ratio_of_the_private_kind_when_the_structure_has_none(tmp_path):
    lib = {"structure": {"kinds": {"private": {"ratio": 1.2}, "mbc": {"ratio": 0.9}}}}
    a = _hand_study(tmp_path / "a", "a", {"x": HOLDS}, lib)
    b = _hand_study(tmp_path / "b", "b", {"x": HOLDS}, {"preset": "custom"})
    sa, sb = compare([a, b])["studies"]
    assert (sa["off_task_ratio"], sa["mbc_off_task_ratio"], sa["preset"]) == (1.2, 0.9, None)
    assert (sb["preset"], sb["design"], sb["folder"]) == ("custom", None, "2")


def test_fewer_than_two_studies_or_one_twice(three):
    root, folders = three
    with pytest.raises(LorafuseError, match="at least two studies; got 1") as e:
        write_compare(folders[:1], root / "regimes")
    assert str(folders[0]) in str(e.value) and "two or more" in str(e.value)
    with pytest.raises(LorafuseError, match="at least two studies; got 0"):
        write_compare([], root / "regimes")
    again = root / "transfer" / ".." / "transfer"  # the same folder, spelled differently
    with pytest.raises(LorafuseError, match="is given twice") as e:
        write_compare([folders[0], folders[1], again], root / "regimes")
    assert str(again) in str(e.value) and "give each study once" in str(e.value)
    with pytest.raises(LorafuseError, match="at least two studies"):
        compare([json.loads((folders[0] / "results.json").read_text())])
    assert not (root / "regimes").exists()  # nothing written


@pytest.mark.parametrize(
    "damage, said",
    [
        (lambda r: r["claims"][0].update(verdict=None), "field 'claims.0.verdict': expected a str"),
        (lambda r: r["claims"].append("a claim"), "expected an object, got \"a claim\""),
        (lambda r: r["methods"][0].update(mean="1.2"), "field 'methods.0.mean': expected a number"),
        (lambda r: r["methods"][0]["per_task"].update(t0=[1]), "'methods.0.per_task.t0': expected"),
        (lambda r: r["config"].update(seeds="0,1"), "field 'config.seeds': expected a list"),
        (lambda r: r["library"].update(structure=[0.3]), "field 'library.structure': expected an"),
        (lambda r: r.update(robust_claims=[{"claim": "c"}]), "'robust_claims.0.verdict': missing"),
    ],
)  # fmt: skip
def test_a_hand_edited_results_file_names_the_field(two, damage, said):
    root, a, _ = two
    results = json.loads(json.dumps(a))
    damage(results)
    (root / "a" / "results.json").write_text(json.dumps(results))
    with pytest.raises(LorafuseError, match="results.json") as e:
        write_compare([root / "a", root / "b"], root / "regimes")
    assert said in str(e.value) and "--out" in str(e.value)
    assert not (root / "regimes").exists()
