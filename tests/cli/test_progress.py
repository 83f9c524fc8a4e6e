"""Long jobs speak in logs: plain flushed lines when stdout is not a terminal, rich bars
when it is (`lorafuse.cli.progress`), through build, matrix, fit and study."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from lorafuse.cli import app, common
from lorafuse.cli.progress import Stages, duration, log_every
from lorafuse.errors import LorafuseError

runner = CliRunner()  # its stdout is not a terminal: the commands write a log
EVERY = {"LORAFUSE_LOG_EVERY": "0"}  # a progress line at every update


def _log(every: str = "0", **kw) -> tuple[Stages, io.StringIO]:
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAFUSE_LOG_EVERY", every)
        return Stages(Console(file=buf, width=60, **kw)), buf


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)  # without the terminal's codes


def test_a_log_gets_start_progress_and_done_lines():
    stages, buf = _log()
    with stages:
        stages.plan(["a", "b"])
        stages.start("a", 4, "steps")
        for _ in range(4):
            stages.advance()
        stages.finish()
        stages.start("b")
        stages.tick(8)  # rows of cached passes
        stages.tick(1, 0.5)  # a step and its loss
        stages.finish("b", cached=False)
        stages.kept("c")
        stages.start("a stage whose name is longer than the console is wide, " * 2)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "start a (1/2)"
    assert re.fullmatch(r"a: 1/4 steps, \S+ elapsed, ETA \S+", lines[1]), lines[1]
    assert re.fullmatch(r"a: 4/4 steps, \S+ elapsed", lines[4]), lines[4]  # no ETA at the end
    assert re.fullmatch(r"done a in \S+ \(4/4 steps\)", lines[5]), lines[5]
    assert lines[6] == "start b (2/2)" and lines[7].startswith("b: 8 done, ")
    assert lines[8].startswith("b: 9 done (step 1, loss 0.5000), ")
    assert re.fullmatch(r"done b in \S+ \(9 done\)", lines[9]) and lines[10] == "kept c"
    assert lines[11].startswith("start a stage") and lines[12].startswith("done a stage")
    assert "\x1b" not in buf.getvalue()  # plain text, one line however long


def test_progress_lines_wait_for_the_interval_and_parts_restart_the_eta():
    stages, buf = _log("3600")
    with stages:
        stages.start("build", None)
        stages.update(3, 10)
        stages.update(1, 5)  # another part of the stage (the study's build)
        stages.finish("build", cached=True)
    assert buf.getvalue().splitlines() == ["start build", "done build in 0.0s (cached)"]
    stages, buf = _log()
    with stages:
        stages.start("build")
        stages.update(10, 10)
        stages.update(1, 5)
        stages.update(1, 5)  # nothing moved: no line
        stages.finish()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 4 and lines[2].startswith("build: 1/5, ")
    assert re.fullmatch(r"done build in \S+", lines[3])  # no count over several parts


def test_a_terminal_gets_bars_and_done_lines():
    stages, buf = _log(force_terminal=True)
    with stages:
        stages.plan(["fit"])
        stages.start("fit", 10)
        stages.update(3, 10)
        stages.bar.refresh()
        stages.finish()
    text = _plain(buf.getvalue())
    assert "━" in text and "3/10" in text and "overall" in text
    assert "done fit in" in text and "start fit" not in text and "fit: 3/10" not in text


def test_interval_and_durations():
    assert [duration(s) for s in (4.23, 45, 80, 3725)] == ["4.2s", "45s", "1m20s", "1h02m"]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("LORAFUSE_LOG_EVERY", raising=False)
        assert log_every() == 30
        for bad in ("soon", "-1", "nan", "inf"):
            mp.setenv("LORAFUSE_LOG_EVERY", bad)
            with pytest.raises(LorafuseError, match="LORAFUSE_LOG_EVERY"):
                log_every()


@pytest.fixture(scope="module")
def build_log(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress") / "bench"
    args = ["benchmark", "build", "--preset", "micro", "--out", str(root), "--no-evaluate"]
    res = runner.invoke(app, args, env=EVERY)
    assert res.exit_code == 0, res.output
    return root, res.output


def test_build_log_has_a_line_per_stage_and_progress_lines(build_log):
    root, log = build_log
    for i, stage in enumerate(("data", "base", "private", "structure", "shared", "mbc"), 1):
        assert f"start build {stage} ({i}/7)\n" in log
        assert re.search(rf"^done build {stage} in \S+ \(\d+/\d+", log, re.M), stage
    assert re.search(r"^build base: \d+/20 steps, \S+ elapsed, ETA \S+$", log, re.M)
    assert re.search(r"^build private: \d+/24 expert steps, \S+ elapsed", log, re.M)
    assert "build evaluate" not in log  # --no-evaluate: no such stage
    again = runner.invoke(app, ["benchmark", "build", "--preset", "micro", "--out", str(root)])
    assert again.exit_code == 0, again.output
    assert "kept build private\n" in again.output and "start build evaluate (8/8)" in again.output


def test_matrix_and_fit_logs(build_log, tmp_path):
    root, _ = build_log
    args = ["--library", str(root), "--max-examples-per-task", "2"]
    res = runner.invoke(app, ["matrix", *args, "--out", str(tmp_path / "m.json")], env=EVERY)
    assert res.exit_code == 0, res.output
    assert "start matrix private/validation\n" in res.output
    assert re.search(r"^matrix private/validation: \d+/32 expert-examples", res.output, re.M)
    assert re.search(r"^done matrix base model in \S+$", res.output, re.M)
    fit = ["fit", *args, "--method", "merge-sgd-global", "--max-steps", "1", "--lr", "0.01"]
    res = runner.invoke(app, fit, env=EVERY)
    assert res.exit_code == 0, res.output
    assert "start fit merge-sgd-global over the private experts\n" in res.output
    assert re.search(
        r"experts: \d+ done \(step 1, loss \d\.\d{4}\), \S+ elapsed$", res.output, re.M
    )
    assert "done fit merge-sgd-global over the private experts in " in res.output
    res = runner.invoke(
        app, ["fit", *args, "--method", "ensemble-sgd"], env={"LORAFUSE_LOG_EVERY": "x"}
    )
    assert res.exit_code == 2 and "LORAFUSE_LOG_EVERY" in res.output


def test_study_log(build_log, tmp_path):
    root, _ = build_log
    cfg = tmp_path / "study.yaml"
    cfg.write_text(
        f"build: {{preset: micro, out: {root}}}\nexamples: {{fit: 2, validation: 2, test: 2}}\n"
        "generation: null\nmethods: [merge-uniform]\n"
        "analyses: {connectivity: null, greedy: false}\n"
    )
    res = runner.invoke(
        app, ["study", "--config", str(cfg), "--out", str(tmp_path / "o")], env=EVERY
    )
    assert res.exit_code == 0, res.output
    log = res.output
    assert "start build (1/5)\n" in log and re.search(r"^done build in \S+ \(cached\)$", log, re.M)
    assert "start merge-uniform@private (3/5)\n" in log
    assert re.search(r"^merge-uniform@private: \d+ done, \S+ elapsed$", log, re.M)
    assert re.search(r"^done report in \S+$", log, re.M)


def test_a_terminal_stdout_gets_the_bar(build_log, tmp_path, monkeypatch):
    root, _ = build_log
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(common, "console", Console(file=out, force_terminal=True))
    monkeypatch.setattr(common, "err_console", Console(file=err, force_terminal=True))
    args = ["matrix", "--library", str(root), "--max-examples-per-task", "1", "--no-base"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "m.json")], env=EVERY)
    assert res.exit_code == 0, res.output
    assert "\x1b[?25l" in err.getvalue()  # rich's live display hid the cursor: a bar
    assert "done matrix private/validation in" in _plain(err.getvalue())
    assert "start matrix" not in res.output + out.getvalue() + err.getvalue()
