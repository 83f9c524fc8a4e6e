"""`lorafuse generate` through the CLI: answers of every kind of method, refusals."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from lorafuse.cli import app
from lorafuse.methods.run import generate_text
from lorafuse.spec import load_spec
from lorafuse.workspace import Workspace

runner = CliRunner()


def test_generate_prints_one_answer_per_prompt(mini_bench):
    prompts = ["upper: cat", "reverse: dog"]
    base = ["generate", "--library", str(mini_bench), "--max-new-tokens", "4"]
    ws = Workspace(load_spec(mini_bench))
    for method, extra in (("ensemble-uniform", []), ("oracle", ["--task", "upper"])):
        args = [*base, "--method", method, *extra]
        res = runner.invoke(app, [*args, "--prompt", prompts[0], "--prompt", prompts[1]])
        assert res.exit_code == 0, res.output
        task = "upper" if method == "oracle" else None
        expected = generate_text(ws, method, prompts, "private", task, max_new_tokens=4)
        for i, answer in enumerate(expected):  # random experts: answers may hold newlines
            assert f"[{i + 1}] {answer}" in res.output


def test_generate_refuses_bad_input(mini_bench):
    args = ["generate", "--library", str(mini_bench), "--prompt", "upper: cat"]
    res = runner.invoke(app, [*args, "--method", "oracle"])
    assert res.exit_code == 2 and "give one of its tasks" in " ".join(res.output.split())
    res = runner.invoke(app, [*args, "--method", "oracle", "--task", "nope"])
    assert res.exit_code == 2 and "'nope'" in res.output
    res = runner.invoke(app, [*args, "--method", "magic"])
    assert res.exit_code == 2 and "known methods" in res.output
    res = runner.invoke(app, [*args, "--method", "base", "--max-new-tokens", "0"])
    assert res.exit_code == 2 and "0 is not a count >= 1" in " ".join(res.output.split())
    res = runner.invoke(app, [*args, "--method", "ensemble-sgd"])  # never fitted here
    assert res.exit_code == 2 and "lorafuse fit" in " ".join(res.output.split())


def test_generate_help_does_not_import_torch():
    argv = ["lorafuse", "generate", "--help"]
    code = f"import sys; from lorafuse.cli import main; sys.argv={argv!r}\n"
    code += "try:\n    main()\nexcept SystemExit:\n    pass\n"
    code += "assert 'torch' not in sys.modules, 'torch imported by --help'\nprint('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--prompt" in out.stdout and out.stdout.strip().endswith("ok")
