"""`lorafuse compare` on the command line: two studies' folders in, compare.md out; a folder
that is not a finished study exits 2 naming it, and nothing is written."""

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
