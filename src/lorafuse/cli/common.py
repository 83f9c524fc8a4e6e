"""Helpers shared by the CLI commands: error reporting, seeds, tables, parsing.

Both consoles print text literally (`markup=False`): a path, expert name or value that
came from the user or a file is never read as rich markup. Styled words go through
`styled`, which builds a rich Text with the user's part left as it is.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.text import Text

console = Console(markup=False)
err_console = Console(stderr=True, markup=False)

#: Set by the global `--debug` flag (or LORAFUSE_DEBUG=1): show tracebacks of internal errors.
DEBUG = {"on": os.environ.get("LORAFUSE_DEBUG", "") not in ("", "0")}

_OS_HINTS = {
    errno.EACCES: "check the permissions of that path or choose another one",
    errno.EPERM: "check the permissions of that path or choose another one",
    errno.EROFS: "the file system is read-only; choose a path on a writable one",
    errno.ENOTDIR: "a part of that path is a file, not a folder; choose another path",
    errno.EISDIR: "that path is a folder where a file was expected; choose a file path",
    errno.EEXIST: "it exists already; choose another path or remove it",
    errno.ENOSPC: "the disk is full; free some space or choose another disk",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
    errno.ENOENT: "it does not exist; check the path",
}


def styled(label: str, style: str, rest: str = "") -> Text:
    """`label` in `style`, then `rest` printed as it is (never read as markup)."""
    return Text.assemble((label, style), " " if rest else "", rest)


def warn(message: str) -> None:
    """One yellow `warning:` line on stderr; the message is printed literally."""
    err_console.print(styled("warning:", "bold yellow", message), highlight=False, soft_wrap=True)


def describe_os_error(e: OSError) -> str:
    """One line for an OS error: what failed, on which path, and what would fix it."""
    where = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    what = e.strerror or type(e).__name__
    hint = _OS_HINTS.get(e.errno, "")
    line = f"{what}: {where}" if where else what
    return f"{line} ({hint})" if hint else line


def _fail(message: str, code: int) -> None:
    err_console.print(styled("error:", "bold red", message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Run a command's body: every foreseen error becomes one line and exit 2.

    - LorafuseError (bad input, bad options, clashing paths): its message, exit 2.
    - OSError (permissions, a file where a folder should be, a full disk): the path, the
      reason and a hint, exit 2.
    - Ctrl-C: "interrupted", exit 130 (outputs are written atomically, so none is left
      half-written).
    - Anything else is a bug: one "internal error" line and exit 1; `lorafuse --debug`
      (or LORAFUSE_DEBUG=1) shows the traceback instead.
    Warnings lorafuse raises (LorafuseWarning) are printed as `warning:` lines.
    """
    import warnings

    from lorafuse.errors import LorafuseError, LorafuseWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", LorafuseWarning)
        plain = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, LorafuseWarning):
                warn(str(message))
            else:
                plain(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            yield
        except (typer.Exit, typer.Abort):
            raise
        except LorafuseError as e:
            _fail(str(e), 2)
        except OSError as e:
            if DEBUG["on"]:
                raise
            _fail(describe_os_error(e), 2)
        except KeyboardInterrupt:
            _fail("interrupted; nothing half-written was left behind", 130)
        except Exception as e:  # noqa: BLE001 - the last line of defence of the CLI
            if DEBUG["on"]:
                raise
            _fail(
                f"internal error ({type(e).__name__}: {e}); this is a bug in lorafuse. Rerun "
                "with `lorafuse --debug ...` for the traceback and report it.",
                1,
            )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for reproducible numbers."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_floats(text: str | None, what: str) -> list[float] | None:
    """Parse '0.5,0.3,0.2' into finite floats; raise LorafuseError naming `what` otherwise."""
    import math

    from lorafuse.errors import LorafuseError

    if text is None:
        return None
    parts = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [float(t) for t in parts]
    except ValueError:
        raise LorafuseError(f"{what} must be comma-separated numbers; got {text!r}") from None
    bad = [p for p, v in zip(parts, values) if not math.isfinite(v)]
    if bad:
        raise LorafuseError(f"{what} must be finite numbers; got {', '.join(bad)} in {text!r}")
    if not values:
        raise LorafuseError(f"{what} is empty; give comma-separated numbers")
    return values


def parse_names(text: str | None, what: str) -> list[str] | None:
    """Parse 'a,b,c' into names (None stays None); an empty list is refused."""
    from lorafuse.errors import LorafuseError

    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise LorafuseError(f"{what} is empty; give comma-separated names")
    return names


def parse_dtype(name: str):
    """'fp32' / 'bf16' / 'fp16' -> torch dtype; raise LorafuseError otherwise."""
    from lorafuse.dtypes import dtype

    return dtype(name, "--dtype")


@contextlib.contextmanager
def progress_bar(total: int | None, description: str, unit: str = "") -> Iterator:
    """One stage of progress, `description`: a rich bar on a terminal, plain log lines
    otherwise (`lorafuse.cli.progress.Stages`); yields a callback `advance(n)` for library
    code."""
    from lorafuse.cli.progress import Stages

    with Stages() as stages:
        stages.start(description, total, unit)
        yield stages.advance
        stages.finish()
