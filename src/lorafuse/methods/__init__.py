"""Methods by name: one registry that every fusion strategy adds itself to.

A method turns a Workspace into a `Prepared` forward (batch -> logits). Names may carry
an argument after a colon, e.g. `single:<expert>`. Importing this package registers the
built-in methods; an unknown name lists the known ones.
"""

from __future__ import annotations

from lorafuse.methods import (  # noqa: F401  (importing a module registers its methods)
    baselines,
    distill,
    ensemble_sgd,
    ensembles,
    hc,
    merging,
    routing,
)
from lorafuse.methods.registry import METHODS, Method, Prepared, register, resolve

__all__ = ["METHODS", "Method", "Prepared", "register", "resolve"]
