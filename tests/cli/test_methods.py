"""`lorafuse methods`: the method table with each method's options, from the table itself."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from lorafuse.cli import app
from lorafuse.methods.registry import METHODS

runner = CliRunner()


def test_lists_every_method_with_role_cost_and_options():
    r = runner.invoke(app, ["methods"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # the console wraps long lines
    for m in METHODS:
        assert f"{m.name}{':<arg>' if m.needs_arg else ''} ({m.role};" in text, m.name
        assert m.cost.describe() in text
    assert "max_steps: " in text and "step cap of every run" in text  # route-sgd's options
    assert "clusters: " in text and "lr_grid: " in text


def test_without_options_it_lists_only_the_rows():
    r = runner.invoke(app, ["methods", "--no-options"])
    assert r.exit_code == 0 and "route-sgd (routing;" in r.output
    assert "max_steps:" not in r.output


def test_help_does_not_import_torch():
    code = "import sys; from lorafuse.cli import main; sys.argv=['lorafuse', 'methods', '--help']\n"
    code += "try:\n    main()\nexcept SystemExit:\n    pass\n"
    code += "assert 'torch' not in sys.modules, 'torch imported by --help'\nprint('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--no-options" in out.stdout and out.stdout.strip().endswith("ok")
