"""`lorafuse compare`: two or more finished studies claim by claim (which regime, that is
which design of the library, decides the winner)."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafuse.cli.common import console, user_errors


def compare_command(
    studies: list[Path] = typer.Argument(
        ...,
        help="Two or more finished studies' folders (each a `lorafuse study --out`), e.g. one "
        "per design of the built-in library: transfer, interference, replay.",
        show_default=False,
    ),
    out: Path = typer.Option(
        Path("runs/regimes"), "--out", "-o", help="Folder for compare.md and compare.json."
    ),
) -> None:
    """Compare two or more studies claim by claim: each one's verdict and numbers, and
    whether the conclusion depends on the regime (same verdict, differs, not comparable).
    Labels each study with its preset, design and library statistics (off-task ratio
    included). Writes compare.md and compare.json into --out."""
    with user_errors():
        from lorafuse.io import check_disjoint, check_output
        from lorafuse.study.compare import write_compare

        check_output(out, force=True, kind="dir")
        check_disjoint({"--out": out}, {"STUDIES": studies})
        written = write_compare(studies, out)
        counts = written["comparison"]["counts"]
        console.print(", ".join(f"{k}: {n}" for k, n in counts.items()), highlight=False)
        md, js = written["compare.md"], written["compare.json"]
        console.print(f"comparison: {md} and {js}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `compare` to the CLI."""
    app.command("compare")(compare_command)
