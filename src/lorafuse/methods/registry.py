"""The method table: every method, listed explicitly (no registration at import).

Each family file exposes its rows as a tuple `METHODS`; this table is their sum, in the
order `lorafuse methods` prints them. A new method is one file (or one function in a
family file) and one row here. Names may carry an argument after a colon, e.g.
`single:<expert>`, `ensemble-sparse:4`.
"""

from __future__ import annotations

from lorafuse.errors import LorafuseError
from lorafuse.methods import (
    baselines,
    delta_merges,
    distill,
    ensemble_sgd,
    ensembles,
    hc,
    merge_search,
    merging,
    routing,
)
from lorafuse.methods.method import Method

METHODS: tuple[Method, ...] = (
    *baselines.METHODS,
    *ensembles.METHODS,
    *ensemble_sgd.METHODS,
    *distill.METHODS,
    *merging.METHODS,
    *delta_merges.METHODS,
    *merge_search.METHODS,
    *routing.METHODS,
    *hc.METHODS,
)
BY_NAME: dict[str, Method] = {m.name: m for m in METHODS}
assert len(BY_NAME) == len(METHODS), "two methods share a name"


def resolve(name: str) -> tuple[Method, str | None]:
    """(method, argument) for `name` or `name:arg`; LorafuseError lists known names."""
    base, _, arg = name.partition(":")
    if base not in BY_NAME:
        known = ", ".join(m.name + (":<arg>" if m.needs_arg else "") for m in METHODS)
        raise LorafuseError(f"unknown method {name!r}; known methods: {known}")
    method = BY_NAME[base]
    if method.needs_arg and not arg:
        raise LorafuseError(f"method {base} needs an argument: {base}:<value>")
    if arg and not method.needs_arg:
        raise LorafuseError(f"method {base} takes no argument (got {name!r})")
    return method, arg or None
