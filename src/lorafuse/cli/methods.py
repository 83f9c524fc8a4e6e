"""`lorafuse methods`: the method table, with each method's options."""

from __future__ import annotations

import typer

from lorafuse.cli.common import console, styled, user_errors


def methods_command(
    options: bool = typer.Option(True, help="List each method's options (type, default, doc)."),
) -> None:
    """Every method: name, role, inference cost, what it fits, and its options."""
    with user_errors():
        from lorafuse.methods.registry import METHODS

        for m in METHODS:
            name = m.name + (":<arg>" if m.needs_arg else "")
            fit = f"fit by {m.fitted_by}" if m.fitted_by else ("fitted" if m.fit else "no fit")
            console.print(
                styled(name, "bold", f"({m.role}; {m.cost.describe()}; {fit}): {m.description}"),
                highlight=False,
                soft_wrap=True,
            )
            if not options:
                continue
            for key, field in m.options.model_fields.items():
                kind = getattr(field.annotation, "__name__", None) or str(field.annotation)
                console.print(
                    f"    {key}: {kind} = {field.default!r}  {field.description or ''}",
                    highlight=False,
                    soft_wrap=True,
                )


def register(app: typer.Typer) -> None:
    """Add `lorafuse methods` to the CLI."""
    app.command("methods")(methods_command)
