"""No bad option value ever reaches a command: every command, every shared option kind.

Every numeric or named option of every command is one of the shared option types of
`lorafuse.cli.options`; each bad value is refused while parsing with exit 2, the option
and the value named, no traceback, and nothing written.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import click
import pytest
import typer
from typer.models import OptionInfo
from typer.testing import CliRunner

from lorafuse.cli import app

runner = CliRunner()

BAD = {
    "count": ["0", "-1", "1.5", "many", "[/]"],
    "seed": ["-1", "4294967296", "x"],
    "positive": ["0", "-0.5", "nan", "inf", "[bold]"],
    "nonneg": ["-1", "nan", "-inf"],
    "number": ["nan", "inf"],
    "probability": ["1", "1.5", "-0.1", "nan"],
    "fraction": ["0", "1.5", "-0.1", "nan"],
    "device": ["tpu9", "cuda:x", "gpu", "[/]"],
    "dtype": ["fp8", "float32", "[/]"],
    "split": ["dev", "TEST", "[draft]"],
}


def _commands() -> dict[str, object]:
    """Command path ('merge', 'benchmark build') -> its Python function."""
    found = {}
    for c in app.registered_commands:
        found[c.name or c.callback.__name__.replace("_", "-")] = c.callback
    for g in app.registered_groups:
        for c in g.typer_instance.registered_commands:
            found[f"{g.name} {c.name or c.callback.__name__}"] = c.callback
    return found


def _typed_options() -> list[tuple[str, str, str]]:
    """(command, --option, kind) for every option made by a shared option type."""
    rows = []
    for name, fn in _commands().items():
        for pname, p in inspect.signature(fn).parameters.items():
            info = p.default
            kind = getattr(getattr(info, "callback", None), "kind", None)
            if isinstance(info, OptionInfo) and kind:
                flag = next((d for d in info.param_decls if d.startswith("--")), None)
                rows.append((name, flag or "--" + pname.replace("_", "-"), kind))
    return rows


def _click(command: str) -> click.Command:
    group = typer.main.get_command(app)
    ctx = click.Context(group)
    cmd = group
    for part in command.split():
        cmd = cmd.get_command(ctx, part)
    return cmd


def _required(command: str, tmp: Path, skip: str) -> list[str]:
    """Plausible values for the command's required parameters (never checked here)."""
    args: list[str] = []
    for p in _click(command).params:
        if not p.required or skip in getattr(p, "opts", []):
            continue
        value = str(tmp / f"in-{p.name}")
        if isinstance(p, click.Argument):
            args.append(value)
        else:
            args += [p.opts[0], value]
    return args


CASES = [(c, o, k, v) for c, o, k in _typed_options() for v in BAD[k]]


def test_every_numeric_or_named_option_has_a_shared_type():
    typed = {(c, o) for c, o, _ in _typed_options()}
    untyped = []
    for command, fn in _commands().items():
        for pname, p in inspect.signature(fn).parameters.items():
            numeric = p.annotation in ("int", "float", "list[float]", "list[int]")
            if numeric and isinstance(p.default, OptionInfo):
                decls = [d for d in p.default.param_decls if d.startswith("--")]
                flag = decls[0] if decls else "--" + pname.replace("_", "-")
                if (command, flag) not in typed:
                    untyped.append(f"{command} {flag}")
    assert not untyped, f"options without a shared type: {untyped}"
    kinds = {k for _, _, k in _typed_options()}
    assert {"count", "seed", "device", "dtype", "split", "probability"} <= kinds


@pytest.mark.parametrize("command, option, kind, value", CASES)
def test_bad_option_value_is_refused_before_anything_runs(command, option, kind, value, tmp_path):
    os.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    argv = [*command.split(), *_required(command, tmp_path, option), option, value]
    res = runner.invoke(app, argv, env={"COLUMNS": "400"})
    shown = " ".join(res.output.split())
    assert res.exit_code == 2, (argv, res.output)
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert f"'{option}'" in shown and value in shown, shown
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
