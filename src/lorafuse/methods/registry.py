"""The method registry: name -> Method, with a helpful error for unknown names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lorafuse.errors import LorafuseError


@dataclass
class Prepared:
    """A ready-to-run method: `forward(batch) -> logits (B, T, V)` and a clean-up."""

    forward: Callable[[Any], Tensor]
    close: Callable[[], None] = lambda: None
    passes: int = 1  # forward passes of the base model per token at inference
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A named fusion strategy (or baseline)."""

    name: str
    family: str  # baseline | ensembling | merging | routing
    description: str
    prepare: Callable[..., Prepared]  # (workspace, kind, arg) -> Prepared
    needs_arg: bool = False
    fit: Callable[..., dict[str, Any]] | None = None  # (workspace, kind, arg, options) -> fit
    fitted_by: str | None = None  # the method whose fit this one evaluates (a top-k variant)
    # For probability-level ensembles: (workspace, kind, arg) -> weights (N,), so a caller
    # holding every expert's cached target log-probabilities can score it without passes.
    weights: Callable[..., Tensor] | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to the registry (a name may be registered once)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name} registered twice")
    METHODS[method.name] = method
    return method


def resolve(name: str) -> tuple[Method, str | None]:
    """(method, argument) for `name` or `name:arg`; LorafuseError lists known names."""
    base, _, arg = name.partition(":")
    if base not in METHODS:
        known = ", ".join(m.name + (":<arg>" if m.needs_arg else "") for m in METHODS.values())
        raise LorafuseError(f"unknown method {name!r}; known methods: {known}")
    method = METHODS[base]
    if method.needs_arg and not arg:
        raise LorafuseError(f"method {base} needs an argument: {base}:<value>")
    if arg and not method.needs_arg:
        raise LorafuseError(f"method {base} takes no argument (got {name!r})")
    return method, arg or None
