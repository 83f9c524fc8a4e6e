"""`lorafuse import-mttl`: an mttl expert library -> PEFT adapter folders."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafuse.cli import options as opt
from lorafuse.cli.common import console, parse_names, seed_everything, user_errors


def import_mttl(
    source: str = typer.Argument(
        ..., help="An mttl library: a local folder of <name>.meta + <name>.ckpt, or a hub id."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: one PEFT adapter each."),
    experts: str = typer.Option(None, help="Comma-separated expert names (default: all)."),
    alpha: float = opt.number(
        None, help="LoRA alpha for every expert (default: its .meta).", positive=True
    ),
    ignore_meta: bool = typer.Option(
        False, help="Read only the .ckpt files (tasks = names; needs --alpha)."
    ),
    force: bool = typer.Option(False, help="Replace the output folder if it exists."),
    seed: int = opt.seed(help="Random seed (the conversion is deterministic)."),
) -> None:
    """Convert an mttl expert library (e.g. the paper's Phi-2 Flan experts) to PEFT adapters."""
    with user_errors():
        seed_everything(seed)
        from rich.table import Table

        from lorafuse.formats.mttl import convert_library, read_library, resolve_library
        from lorafuse.io import check_disjoint, check_output

        check_output(out, force, kind="dir")
        select = parse_names(experts, "--experts")
        folder = resolve_library(source)
        check_disjoint({"--out": out}, {"SOURCE": folder})
        lib = read_library(folder, alpha=alpha, use_meta=not ignore_meta)
        written = convert_library(lib, out, select=select, force=force, source=str(source))
        by_name = {e.name: e for e in lib}
        chosen = [by_name[n] for n in select] if select else [e for e in lib]
        table = Table(title=f"{len(written)} mttl experts -> PEFT adapters in {out}")
        for col in ("expert", "folder", "rank", "alpha", "tasks", "base model"):
            table.add_column(col)
        for e, path in zip(chosen, written):
            tasks = ",".join(e.tasks[:3]) + (" ..." if len(e.tasks) > 3 else "")
            row = (
                e.name,
                path.name,
                str(e.rank or "-"),
                f"{e.alpha:g}",
                tasks,
                e.base_model or "-",
            )
            table.add_row(*row)
        console.print(table)


def register(app: typer.Typer) -> None:
    """Add the conversion commands to the CLI."""
    app.command("import-mttl")(import_mttl)
