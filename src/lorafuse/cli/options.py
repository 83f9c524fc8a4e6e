"""One option type per kind of value, shared by every command.

Each factory returns a typer Option whose value is checked while the command line is
parsed, before a command does anything: a bad value is a usage error (exit 2) naming the
option and the value. Nothing here imports torch (so `--help` stays fast).

- `count`: a whole number >= 1 (or >= `minimum`): threads, steps, ranks, caps, batches.
- `seed`: a whole number in [0, 2**32 - 1] (what NumPy and torch both accept).
- `number`: a finite float, optionally > 0 or >= 0: learning rates, alpha, deltas.
- `probability`: a finite float in [0, 1) (a rate: dropout, a drop rate).
- `fraction`: a finite float in (0, 1] (a share kept: a density).
- `device`: cpu, cuda, cuda:N, mps, xpu, xpu:N (whether it exists is checked on use).
- `dtype`: fp32, bf16 or fp16.
- `split`: train, validation or test.
"""

from __future__ import annotations

import math
from typing import Any

import typer

from lorafuse.devices import DEVICE_RE
from lorafuse.dtypes import NAMES as DTYPES

SPLITS = ("train", "validation", "test")
SEED_MAX = 2**32 - 1


def _kind(check, kind: str):
    # Each check names its kind of value: the CLI's tests find every option by it.
    check.kind = kind
    return check


def _as_int(text) -> int:
    if isinstance(text, int):
        return text
    try:
        return int(str(text).strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a whole number") from None


def _as_float(text) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    try:
        return float(str(text).strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number") from None


def _whole(low: int, high: int | None, what: str):
    def check(value):
        if isinstance(value, (list, tuple)):
            return type(value)(check(v) for v in value)
        if value is not None and (value < low or (high is not None and value > high)):
            where = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise typer.BadParameter(f"{value} is not {what} {where}")
        return value

    return _kind(check, what.split()[-1])


def count(default: Any, *decls: str, help: str, minimum: int = 1) -> Any:
    """A whole-number option that must be >= `minimum` (1 unless said otherwise)."""
    check = _whole(minimum, None, "a count")
    return typer.Option(default, *decls, parser=_as_int, callback=check, help=help)


def seed(default: Any = 0, *decls: str, help: str = "Random seed.") -> Any:
    """A random seed: a whole number in [0, 2**32 - 1]."""
    check = _whole(0, SEED_MAX, "a seed")
    return typer.Option(default, *decls, parser=_as_int, callback=check, help=help)


def number(default: Any, *decls: str, help: str, positive: bool = False, nonneg: bool = False):
    """A finite float option; `positive` asks for > 0, `nonneg` for >= 0."""

    def check(value):
        if isinstance(value, (list, tuple)):  # a repeatable option: check each value
            return type(value)(check(v) for v in value)
        if value is None:
            return value
        if not math.isfinite(value):
            raise typer.BadParameter(f"{value} is not a finite number")
        if positive and value <= 0:
            raise typer.BadParameter(f"{value:g} must be greater than 0")
        if nonneg and value < 0:
            raise typer.BadParameter(f"{value:g} must be 0 or more")
        return value

    kind = "positive" if positive else "nonneg" if nonneg else "number"
    return typer.Option(default, *decls, parser=_as_float, callback=_kind(check, kind), help=help)


def probability(default: Any, *decls: str, help: str) -> Any:
    """A finite float in [0, 1): a rate such as dropout or a drop rate."""

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        if not (math.isfinite(value) and 0 <= value < 1):
            raise typer.BadParameter(f"{value} is not a probability in [0, 1)")
        return value

    check = _kind(check, "probability")
    return typer.Option(default, *decls, parser=_as_float, callback=check, help=help)


def fraction(default: Any, *decls: str, help: str) -> Any:
    """A finite float in (0, 1]: a share kept, such as a density."""

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        if not (math.isfinite(value) and 0 < value <= 1):
            raise typer.BadParameter(f"{value} is not a fraction in (0, 1]")
        return value

    check = _kind(check, "fraction")
    return typer.Option(default, *decls, parser=_as_float, callback=check, help=help)


def _choice(allowed: tuple[str, ...], what: str):
    def check(value: str | None) -> str | None:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value!r} is not a {what}; choose {', '.join(allowed)}")
        return value

    return _kind(check, what)


def device(default: Any = None, *decls: str, help: str = "cpu, cuda, cuda:1, ...") -> Any:
    """A torch device name: cpu, cuda, cuda:N, mps, xpu, xpu:N."""

    def check(value: str | None) -> str | None:
        if value is not None and not DEVICE_RE.match(value):
            raise typer.BadParameter(
                f"{value!r} is not a device; use cpu, cuda, cuda:N (a GPU index), mps or xpu"
            )
        return value

    return typer.Option(default, *decls, callback=_kind(check, "device"), help=help)


def dtype(default: Any = None, *decls: str, help: str = "fp32 or bf16.") -> Any:
    """A dtype name: fp32, bf16 or fp16."""
    return typer.Option(default, *decls, callback=_choice(DTYPES, "dtype"), help=help)


def split(default: Any, *decls: str, help: str = "train, validation or test.") -> Any:
    """A data split: train, validation or test."""
    return typer.Option(default, *decls, callback=_choice(SPLITS, "split"), help=help)
