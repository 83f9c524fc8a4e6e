"""`lorafuse eval`, `matrix` and `table` through the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lorafuse.cli import app

runner = CliRunner()


def test_eval_writes_results_and_table(mini_bench, tmp_path):
    out = tmp_path / "results"
    args = ["eval", "--library", str(mini_bench), "--split", "test", "--out", str(out)]
    res = runner.invoke(app, [*args, "--method", "base", "--method", "single:count"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "single_count.json").read_text())
    assert data["method"] == "single:count" and data["n_tasks"] == 3
    assert set(data["per_task"]) == {"count", "reverse", "upper"}
    assert data["settings"]["seed"] == 0
    answers = data["answers"]  # generated answers, scored per task
    assert set(answers["per_task"]) == set(data["per_task"])
    em = [v["exact_match"] for v in answers["per_task"].values()]
    assert answers["exact_match"]["mean"] == pytest.approx(sum(em) / 3)
    res = runner.invoke(app, ["table", str(out)])
    assert res.exit_code == 0 and "| single:count | private | test | 3 |" in res.output
    assert "exact match | Rouge-L |" in res.output
    res = runner.invoke(app, [*args, "--method", "base", "--no-answers", "--max-new-tokens", "0"])
    assert res.exit_code == 2 and "0 is not a count >= 1" in " ".join(res.output.split())
    one = tmp_path / "one.json"
    res = runner.invoke(app, [*args[:-1], str(one), "--method", "base", "--no-answers"])
    assert res.exit_code == 0 and "answers" not in json.loads(one.read_text())


def test_eval_unknown_method_and_spec(mini_bench, tmp_path):
    res = runner.invoke(app, ["eval", "--library", str(mini_bench), "--method", "nope"])
    assert res.exit_code == 2 and "known methods" in res.output
    res = runner.invoke(app, ["eval", "--library", str(tmp_path), "--method", "base"])
    assert res.exit_code == 2 and "manifest.json" in res.output


def test_matrix_command(mini_bench, tmp_path):
    out = tmp_path / "m.json"
    res = runner.invoke(app, ["matrix", "--library", str(mini_bench), "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    assert len(m["losses"]) == 3 and len(m["losses"][0]) == 3
    assert (tmp_path / ".m.json.cache").is_dir()
    # the base row is the base model's evaluation on the same split
    from tests.evalref import reference_task_losses

    ref = reference_task_losses(mini_bench, "validation")
    assert m["base"] == pytest.approx([ref[t] for t in m["tasks"]], abs=1e-5)


def test_refactor_command(tmp_path):
    # Expert 1 is not the best on its own task (task b): expert 2 beats it there.
    m = {
        "experts": ["ea", "eb", "ec"],
        "tasks": ["a", "b", "c"],
        "losses": [[0.1, 0.9, 0.9], [0.9, 0.5, 0.9], [0.9, 0.2, 0.1]],
        "n_examples": [2, 2, 2],
        "own": {"a": "ea", "b": "eb", "c": "ec"},
        "base": [0.6, 0.6, 0.3],
    }
    (tmp_path / "m.json").write_text(json.dumps(m))
    out = tmp_path / "ref"
    res = runner.invoke(app, ["refactor", str(tmp_path / "m.json"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "refactor.json").read_text())
    assert r["not_best_on_own_task"] == ["eb"]
    # private oracle = (0.1 + 0.5 + 0.1) / 3; {ea, ec} gives (0.1 + 0.2 + 0.1) / 3, below it.
    assert r["k_reached"] == 2 and (out / "greedy_selection.png").stat().st_size > 1000
    # off-task ratio written out: each expert's loss on the two other tasks over the base's
    ratios = [(0.9 / 0.6 + 0.9 / 0.3) / 2, (0.9 / 0.6 + 0.9 / 0.3) / 2, (0.9 / 0.6 + 0.2 / 0.6) / 2]
    assert r["off_task_ratio"] == pytest.approx(sum(ratios) / 3)
    printed = " ".join(res.output.split())
    assert "not the best on their own task: 1 of 3 experts (33%" in printed
    assert "with 2 of 3 experts (67%)" in printed
    assert f"off-task loss / base model's: {r['off_task_ratio']:.2f}" in printed
    assert "closest built-in design:" in printed
    res = runner.invoke(app, ["refactor", str(tmp_path / "m.json"), "--out", str(out)])
    assert res.exit_code == 2 and "--force" in res.output


def test_fit_until_a_plateau_prints_how_it_ended(mini_bench, tmp_path):
    import shutil

    bench = tmp_path / "bench"
    shutil.copytree(mini_bench, bench)  # the fit is written under the bench's fits/
    args = ["fit", "--library", str(bench), "--method", "merge-sgd-global", "--lr", "0.1"]
    args += ["--batch-size", "5", "--max-steps", "30", "--patience", "2", "--eval-every", "1"]
    res = runner.invoke(app, [*args, "--min-delta", "0.01", "--objective", "token"])
    assert res.exit_code == 0, res.output
    fit = json.loads((bench / "fits" / "merge-sgd-global__private.json").read_text())
    assert fit["options"]["epochs"] is None and fit["options"]["patience"] == 2
    assert fit["options"]["objective"] == "token"
    assert len(fit["runs"][0]["history"]) == fit["steps"] <= 30  # one validation a step
    printed = " ".join(res.output.split())  # the console wraps long lines
    assert f"'stop': '{fit['stop']}'" in printed and "'converged'" in printed
    res = runner.invoke(app, [*args[:7], "--patience", "0"])
    printed = " ".join(res.output.split())
    assert res.exit_code == 2 and "--patience" in printed and "0 is not a count >= 1" in printed
