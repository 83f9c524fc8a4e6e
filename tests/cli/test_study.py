"""`lorafuse study` on the command line: bad input exits 2 with the key and line."""

from __future__ import annotations

from typer.testing import CliRunner

from lorafuse.cli import app

runner = CliRunner()


def test_bad_config_names_key_and_line(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("library: x\nmethods: [base]\nexamples: {tests: 3}\n")
    r = runner.invoke(app, ["study", "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "examples.tests" in r.output and "line 3" in r.output
    assert not (tmp_path / "o").exists()


def test_a_mistyped_method_option_exits_2_naming_it_and_writing_nothing(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        "library: x\nmethods:\n  - base\n  - {name: route-sgd, options: {max_step: 10}}\n"
    )
    r = runner.invoke(app, ["study", "--config", str(cfg), "--out", str(tmp_path / "o")])
    printed = " ".join(r.output.split())  # the console wraps long lines
    assert r.exit_code == 2, r.output
    assert "route-sgd" in printed and "'max_step'" in printed and "line 4" in printed
    assert "allowed options:" in printed and "max_steps" in printed
    assert not (tmp_path / "o").exists()


def test_preset_or_config_not_both(tmp_path):
    r = runner.invoke(app, ["study", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "either --preset" in r.output
    r = runner.invoke(app, ["study", "--preset", "huge", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown study preset" in r.output


def test_bad_seeds_exit_2_before_anything_runs(tmp_path):
    out = tmp_path / "o"
    r = runner.invoke(app, ["study", "--preset", "micro", "--out", str(out), "--seeds", "0,x"])
    assert r.exit_code == 2 and "--seeds must be comma-separated integers" in r.output
    r = runner.invoke(app, ["study", "--preset", "micro", "--out", str(out), "--seeds", "1,1"])
    assert r.exit_code == 2 and "seeds must be distinct" in r.output
    assert not out.exists()
