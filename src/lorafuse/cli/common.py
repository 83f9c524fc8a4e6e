"""Helpers shared by the CLI commands: error reporting, seeds, tables, parsing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn lorafuse's user errors into a red message and exit code 2."""
    from lorafuse.errors import LorafuseError

    try:
        yield
    except LorafuseError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for reproducible numbers."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_floats(text: str | None, what: str) -> list[float] | None:
    """Parse '0.5,0.3,0.2' into floats; raise LorafuseError naming `what` on bad input."""
    from lorafuse.errors import LorafuseError

    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise LorafuseError(f"{what} must be comma-separated numbers; got {text!r}") from None


def parse_dtype(name: str):
    """'fp32' / 'bf16' / 'fp16' -> torch dtype; raise LorafuseError otherwise."""
    from lorafuse.dtypes import dtype

    return dtype(name, "--dtype")


@contextlib.contextmanager
def progress_bar(total: int, description: str) -> Iterator:
    """A rich progress bar; yields a callback `advance(n)` for library code."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
