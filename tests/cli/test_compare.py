"""`lorafuse compare` on the command line: two or more studies' folders in, compare.md out; a
folder that is not a finished study, a single folder or one given twice exits 2 naming the
problem, and nothing is written."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lorafuse.cli import app

runner = CliRunner()


def _study(folder, name: str, verdict: str) -> None:
    folder.mkdir()
    comparison = {"a": "A", "b": "B", "diff": -0.25, "se": 0.05, "n_tasks": 4, "verdict": verdict}
    claim = {"claim": "A beats B", "paper": "p", "verdict": verdict, "evidence": "e",
             "numbers": {"comparisons": [comparison], "missing": []}}  # fmt: skip
    results = {"format": "lorafuse-study/1", "config": {"name": name}, "methods": [],
               "claims": [claim]}  # fmt: skip
    (folder / "results.json").write_text(json.dumps(results))


def test_compare_writes_the_table(tmp_path):
    _study(tmp_path / "a", "first", "holds")
    _study(tmp_path / "b", "second", "does not hold")
    out = tmp_path / "regimes"
    r = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "differs: 1" in r.output and "compare.md" in r.output
    md = (out / "compare.md").read_text()
    assert "| A beats B | holds | A - B = -0.250 ± 0.050 | does not hold |" in md
    assert md.rstrip().endswith("| differs |")
    assert json.loads((out / "compare.json").read_text())["counts"]["differs"] == 1


def test_a_folder_without_results_exits_2(tmp_path):
    _study(tmp_path / "a", "first", "holds")
    (tmp_path / "unfinished").mkdir()
    out = tmp_path / "regimes"
    args = ["compare", str(tmp_path / "a"), str(tmp_path / "unfinished"), "--out", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "unfinished is not a finished study" in text and "lorafuse study --out" in text
    assert not out.exists()


def test_three_studies_one_column_each(tmp_path):
    for name, verdict in (("transfer", "holds"), ("interference", "holds"), ("replay", "holds")):
        _study(tmp_path / name, name, verdict)
    out = tmp_path / "regimes"
    folders = [str(tmp_path / n) for n in ("transfer", "interference", "replay")]
    r = runner.invoke(app, ["compare", *folders, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "same verdict: 1, differs: 0, not comparable: 0" in r.output
    md = (out / "compare.md").read_text()
    assert "| # | claim | transfer | numbers | interference | numbers | replay | numbers |" in md
    assert md.rstrip().endswith("| same verdict |")
    assert len(json.loads((out / "compare.json").read_text())["studies"]) == 3


def test_one_folder_exits_2_and_writes_nothing(tmp_path):
    _study(tmp_path / "a", "first", "holds")
    out = tmp_path / "regimes"
    r = runner.invoke(app, ["compare", str(tmp_path / "a"), "--out", str(out)])
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "at least two studies; got 1" in text and "give two or more" in text
    assert not out.exists()


def test_the_same_folder_twice_exits_2(tmp_path):
    _study(tmp_path / "a", "first", "holds")
    out = tmp_path / "regimes"
    r = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(out)])
    assert r.exit_code == 2
    assert "is given twice" in " ".join(r.output.split())
    assert not out.exists()


def test_the_help_names_two_or_more_studies():
    r = runner.invoke(app, ["compare", "--help"])
    assert r.exit_code == 0 and "two or more" in " ".join(r.output.split()).lower()
