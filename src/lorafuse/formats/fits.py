"""Fitted coefficients on disk: one JSON per (method, expert kind), with its settings.

`lorafuse fit` writes them; `lorafuse eval` (and the study) read them back, so a fitted
method is evaluated with exactly the coefficients it learned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from lorafuse.errors import FileFormatError, LorafuseError
from lorafuse.formats.schema import (
    Count,
    FileModel,
    Finite,
    FiniteArray,
    PositiveInt,
    check,
    one_of,
    read_json,
)
from lorafuse.io import write_json


def fit_output(ws, method: str, kind: str, suffix: str = "") -> Path:
    """Where an output of the fit of `method` over the `kind` experts lives: the fit
    file (suffix .json), a merged adapter or routed model (no suffix), a state, a plot."""
    return Path(ws.fits_dir) / f"{method.replace(':', '_')}__{kind}{suffix}"


def fit_path(ws, method: str, kind: str) -> Path:
    """Where the fit of `method` over the `kind` experts lives."""
    return fit_output(ws, method, kind, ".json")


def save_fit(ws, method: str, kind: str, payload: dict[str, Any]) -> Path:
    """Write a fit (atomically); `payload` must be JSON-ready."""
    return write_json(fit_path(ws, method, kind), {"method": method, "experts": kind, **payload})


Weights = one_of(
    "a (nested) list of finite numbers, or an object of them by module",
    FiniteArray,
    dict[str, FiniteArray],
)


class FitFile(FileModel):
    """A fit file as the methods read it: the fields any of them reads, each typed (a
    method's own other fields are kept as written)."""

    method: str | None = None
    experts: str | None = None
    experts_order: list[str] | None = None
    weights: Weights = None
    lr: Finite | None = None
    space: Literal["factors", "deltas"] | None = None
    routed: str | None = None
    adapter: str | None = None
    teacher: str | None = None
    state: str | None = None
    labels: list[Count] | None = None
    arrow_init: bool | None = None
    clusters: PositiveInt | None = None


def read_fit(path: str | Path, need: tuple[str, ...] = (), again: str = "fit again") -> dict:
    """The fit file at `path`, checked by FitFile, with every field in `need` present.

    Raises FileFormatError naming the file and the field (and saying `again`).
    """
    fit = read_json(path, what="fit file")
    check(fit, FitFile, path, what="fit file")
    missing = [k for k in need if fit.get(k) is None]
    if missing:
        raise FileFormatError(
            f"fit file: {path}: field {missing[0]!r}: missing (the fit writes it); {again}"
        )
    return fit


def load_fit(ws, method: str, kind: str, need: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a fit; raises LorafuseError when it is missing (saying how to make it) or was
    made for other experts than the library's, and FileFormatError naming the file and
    field when it is not valid JSON, a field has the wrong type (see FitFile) or a field
    in `need` is missing."""
    path = fit_path(ws, method, kind)
    again = f"run `lorafuse fit --library {ws.spec.root} --method {method} --experts {kind}`"
    if not path.is_file():
        raise LorafuseError(
            f"method {method} over the {kind} experts has not been fitted ({path} is missing); "
            f"{again} first"
        )
    fit = read_fit(path, need, f"{again} again")
    names = ws.library(kind).names
    if fit.get("experts_order") is not None and fit["experts_order"] != names:
        raise LorafuseError(
            f"the fit of {method} was made for experts {fit['experts_order']}, not the "
            f"library's {names}; fit again"
        )
    return fit
