"""`lorafuse compare`: two finished studies claim by claim (which regime decides the winner)."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafuse.cli.common import console, user_errors


def compare_command(
    first: Path = typer.Argument(..., help="A finished study's folder (its --out)."),
    second: Path = typer.Argument(..., help="Another finished study's folder."),
    out: Path = typer.Option(Path("runs/regimes"), "--out", "-o", help="Folder for compare.md."),
) -> None:
    """Compare two studies claim by claim: each one's verdict and numbers, and whether the
    conclusion depends on the regime. Writes compare.md and compare.json into --out."""
    with user_errors():
        from lorafuse.study.compare import write_compare

        written = write_compare(first, second, out)
        counts = written["comparison"]["counts"]
        console.print(", ".join(f"{k}: {n}" for k, n in counts.items()), highlight=False)
        console.print(f"comparison: {written['compare.md']} and {written['compare.json']}")


def register(app: typer.Typer) -> None:
    """Add `compare` to the CLI."""
    app.command("compare")(compare_command)
