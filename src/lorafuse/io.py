"""Safe writing: outputs are built under a temporary name and renamed into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorafuse.errors import OutputExistsError


def check_output(path: str | os.PathLike, force: bool = False) -> Path:
    """Return `path` as a Path; raise OutputExistsError if it exists and not `force`."""
    out = Path(path)
    if out.exists() and not force:
        raise OutputExistsError(
            f"output path {out} exists already; choose another path or pass --force "
            "(force=True) to replace it"
        )
    return out


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `path`; on success rename it to `path`.

    On any exception the temporary folder is removed and `path` is left untouched, so a
    failed export never leaves a half-written output. Raises OutputExistsError when
    `path` exists and `force` is false.
    """
    out = check_output(path, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output gets normal permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, force: bool = True, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path next to `path`; on success rename it to `path`.

    Write the whole file to the yielded path (torch.save, save_file, savefig, ...). On
    any exception it is removed and `path` is left as it was. `suffix` ends the
    temporary name (a writer that picks the format by extension needs it). Raises
    OutputExistsError when `path` exists and `force` is false.
    """
    out = check_output(path, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", suffix=suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get normal permissions
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str, force: bool = True) -> Path:
    """Write `text` (UTF-8) to `path` through a temporary file and a rename."""
    with atomic_file(path, force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, force: bool = True) -> Path:
    """Write `obj` as indented JSON to `path` through a temporary file and a rename."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", force)


def save_png(fig, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Save a matplotlib Figure as PNG through a temporary file and a rename."""
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    return Path(path)
