"""Safe writing: outputs are built under a temporary name and renamed into place."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lorafuse.errors import LorafuseError, OutputExistsError


def check_output(path: str | os.PathLike, force: bool = False, kind: str | None = None) -> Path:
    """Return `path` as a Path if a command may write it; raise a LorafuseError otherwise.

    Refused: an existing path without `force` (OutputExistsError), a path whose parent
    (or any folder above it) is a file, and with `kind` "file" / "dir" an existing path
    of the other kind (a folder where a file is to be written, or the reverse).
    """
    out = Path(path)
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LorafuseError(
                    f"output path {out}: {parent} is a file, not a folder; choose another path"
                )
            break
    if kind == "file" and out.is_dir():
        raise LorafuseError(f"output path {out} is a folder; give the path of a file to write")
    if kind == "dir" and out.exists() and not out.is_dir():
        raise LorafuseError(f"output path {out} is a file; give the path of a folder to write")
    if out.exists() and not force:
        raise OutputExistsError(
            f"output path {out} exists already; choose another path or pass --force "
            "(force=True) to replace it"
        )
    return out


def check_disjoint(
    outputs: Mapping[str, str | os.PathLike | None], inputs: Mapping[str, Any]
) -> None:
    """Refuse an output that is, lies inside, or holds one of the command's inputs.

    `outputs` and `inputs` map a label (an option name such as "--out", or "expert e3")
    to a path or a list of paths; None entries are skipped. Paths are compared after
    resolving symbolic links. Raises LorafuseError naming both.
    """

    def expand(items: Mapping[str, Any]) -> list[tuple[str, Path]]:
        pairs = []
        for label, value in items.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            pairs += [(label, Path(v).resolve()) for v in values if v is not None]
        return pairs

    outs, ins = expand(outputs), expand(inputs)
    for o_label, o in outs:
        for i_label, i in ins:
            if o == i:
                how = "is"
            elif i in o.parents:
                how = "lies inside"
            elif o in i.parents:
                how = "holds"
            else:
                continue
            raise LorafuseError(
                f"{o_label} {o} {how} the input {i_label} {i}; a command never writes into, "
                "over or around its own inputs: choose an output outside them"
            )
    for k, (a_label, a) in enumerate(outs):
        for b_label, b in outs[k + 1 :]:
            if a == b or a in b.parents or b in a.parents:
                raise LorafuseError(f"{a_label} {a} and {b_label} {b} overlap; choose two apart")


def _owner_tag() -> str:
    # host and pid in every temporary name: a later run removes only its own kind's
    # leftovers, and only those whose process is gone.
    return f"{socket.gethostname().replace('/', '_')}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Remove temporary leftovers of `path` from runs killed mid-write; return them.

    Only names this module makes for that very output (`.<name>.tmp-<host>-<pid>-*`,
    `.<name>.old-<host>-<pid>-*`), made on this host by a process that no longer runs,
    are removed: never another output's, never a running process's.
    """
    out = Path(path)
    if not out.parent.is_dir():
        return []
    host = socket.gethostname().replace("/", "_")
    removed = []
    for kind in ("tmp", "old"):
        prefix = f".{out.name}.{kind}-"
        for stale in out.parent.glob(f"{glob.escape(prefix)}*"):
            parts = stale.name[len(prefix) :].rsplit("-", 2)
            if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
                continue
            if _pid_alive(int(parts[1])):
                continue
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
            removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `path`; on success rename it to `path`.

    On any exception the temporary folder is removed and `path` is left untouched, so a
    failed export never leaves a half-written output; leftovers of an earlier run of the
    same output that was killed are removed first (`remove_stale`). Raises
    OutputExistsError when `path` exists and `force` is false.
    """
    out = check_output(path, force, kind="dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tag = _owner_tag()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{tag}", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output gets normal permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{tag}", dir=out.parent))
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
    out = check_output(path, force, kind="file")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    prefix = f".{out.name}.tmp-{_owner_tag()}"
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=out.parent)
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
