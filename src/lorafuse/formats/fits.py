"""Fitted coefficients on disk: one JSON per (method, expert kind), with its settings.

`lorafuse fit` writes them; `lorafuse eval` (and the study) read them back, so a fitted
method is evaluated with exactly the coefficients it learned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorafuse.errors import LorafuseError
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


def load_fit(ws, method: str, kind: str) -> dict[str, Any]:
    """Read a fit; raises LorafuseError when it is missing (saying how to make it) or was
    made for other experts than the library's."""
    path = fit_path(ws, method, kind)
    if not path.is_file():
        raise LorafuseError(
            f"method {method} over the {kind} experts has not been fitted ({path} is missing); "
            f"run `lorafuse fit --library {ws.spec.root} --method {method} --experts {kind}` first"
        )
    try:
        fit = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LorafuseError(f"fit file {path} is not valid JSON ({e}); fit again") from None
    names = ws.library(kind).names
    if "experts_order" in fit and fit["experts_order"] != names:
        raise LorafuseError(
            f"the fit of {method} was made for experts {fit['experts_order']}, not the "
            f"library's {names}; fit again"
        )
    return fit
