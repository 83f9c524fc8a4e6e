"""Merges on the experts' deltas dW_i = s_i B_i A_i, as PEFT's add_weighted_adapter and mergekit.

- sparsify.py: one delta's magnitude band (TIES trim, magnitude pruning, breadcrumbs)
  and random drop (DARE), seeded per (seed, module, expert).
- combine.py: the reference path: one module's merged delta (O, D), built one expert
  at a time (linear sum, or TIES' sign election and disjoint merge).
- methods.py: the public methods, their argument checks, and the METHODS table.

    from lorafuse.delta_merge import delta_merge
    merged = delta_merge(library, "ties", weights, rank=16, density=0.2)
"""

from lorafuse.delta_merge.methods import (
    METHODS,
    breadcrumbs,
    dare_linear,
    dare_ties,
    delta_merge,
    magnitude_prune,
    peft_linear,
    task_arithmetic,
    ties,
)

__all__ = [
    "METHODS",
    "breadcrumbs",
    "dare_linear",
    "dare_ties",
    "delta_merge",
    "magnitude_prune",
    "peft_linear",
    "task_arithmetic",
    "ties",
]
