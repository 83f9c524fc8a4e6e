"""Combine the experts' deltas of one module into one dense delta (O, D).

The reference path, one module and one expert at a time: dW_i = s_i B_i A_i is formed
from the factors, sparsified (sparsify.py), and added into an accumulator, so memory is
a few (O, D) buffers whatever the number of experts N (PEFT's add_weighted_adapter
stacks all N deltas: N * O * D numbers, several times over). With T the sparsifier:
- linear:    dW = sum_i w_i T(dW_i) (normalising is the caller's: w / sum_i w_i).
- consensus (TIES' elect and disjoint merge): per entry the elected sign is that of
  sum_i v_i T(dW_i), with v_i = 1 (sign_of "deltas": PEFT, the TIES paper) or w_i
  ("weighted": mergekit); expert i agrees where sign(v_i T(dW_i)) equals it (a zeroed
  entry never agrees); dW = sum over agreeing i of w_i T(dW_i), divided per entry by
  the number of agreeing experts ("count": PEFT), their summed weights ("weights":
  mergekit's normalize) or nothing ("none"); a zero divisor counts as 1.
  Two passes over the experts: the first elects, the second mixes. Each T(dW_i) is
  formed again in the second pass (magnitude bands are kept from the first, random
  masks redrawn from their seeds) rather than holding N sparsified deltas.
Experts with w_i = 0 take no part: they neither vote nor count (PEFT's ties lets them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lorafuse.delta_merge.sparsify import generator_for, keep_band, magnitude_band, random_drop
from lorafuse.factors import StackedModule

SPARSIFIERS = ("none", "magnitude", "random")
SIGN_OF = ("deltas", "weighted")
DIVIDE_BY = ("none", "weights", "count")


@dataclass(frozen=True)
class Recipe:
    """How each expert's delta is sparsified, and how the sparsified deltas combine."""

    sparsify: str = "none"  # none | magnitude | random
    density: float = 1.0  # magnitude: fraction of entries kept
    gamma: float = 0.0  # magnitude: fraction of the largest entries dropped (breadcrumbs)
    drop: float = 0.0  # random: drop rate p; kept entries are rescaled by 1/(1-p)
    seed: int = 0  # random: seeds one generator per (seed, module, expert)
    consensus: bool = False  # elect a sign per entry, mix the agreeing entries only
    sign_of: str = "deltas"  # consensus: the votes are T(dW_i) or w_i T(dW_i)
    divide_by: str = "none"  # consensus: none | weights | count


def expert_delta(mod: StackedModule, i: int) -> Tensor:
    """dW_i = s_i B_i A_i (O, D) of expert i, fp32, from its true-rank factors.

    Computed as (B_i @ A_i) * s_i, the order of PEFT's get_delta_weight.
    """
    r = int(mod.rank[i])
    return (mod.B[i, :, :r].float() @ mod.A[i, :r].float()).mul_(float(mod.scale[i]))  # (O, D)


def module_delta(
    mod: StackedModule,
    weights: Tensor,
    recipe: Recipe,
    module: str = "",
    experts: Sequence[str] = (),
) -> Tensor:
    """The merged delta (O, D) of one module under `recipe`, fp32.

    `weights` (N,) are the coefficients w_i; `module` and `experts` (the N expert names)
    seed the random masks, so the same (seed, module, expert) always drops the same
    entries. The caller validates the recipe and weights (the public methods do).
    """
    w = [float(x) for x in weights.tolist()]
    active = [i for i, wi in enumerate(w) if wi != 0.0]
    _, _, D, O = mod.shape
    bands: dict[int, tuple[float, float]] = {}

    def sparsified(i: int) -> Tensor:  # T(dW_i) (O, D)
        dW = expert_delta(mod, i)  # (O, D)
        if recipe.sparsify == "magnitude":
            if i not in bands:
                bands[i] = magnitude_band(dW, recipe.density, recipe.gamma)
            return keep_band(dW, bands[i])
        if recipe.sparsify == "random":
            return random_drop(dW, recipe.drop, generator_for(recipe.seed, module, experts[i]))
        return dW

    out = torch.zeros(O, D)  # (O, D)
    if not recipe.consensus:
        for i in active:
            out.add_(sparsified(i), alpha=w[i])
        return out

    votes = [1.0 if recipe.sign_of == "deltas" else wi for wi in w]
    for i in active:
        out.add_(sparsified(i), alpha=votes[i])
    positive = out >= 0  # (O, D) bool: the elected sign is + where the votes sum to >= 0
    out.zero_()
    divisor = torch.zeros(O, D) if recipe.divide_by != "none" else None  # (O, D)
    for i in active:
        t = sparsified(i)  # (O, D)
        up, down = (t > 0, t < 0) if votes[i] > 0 else (t < 0, t > 0)  # sign of v_i t
        agree = torch.where(positive, up, down)  # (O, D) bool
        out.add_(t.mul_(agree), alpha=w[i])
        if divisor is not None:
            divisor.add_(agree, alpha=1.0 if recipe.divide_by == "count" else w[i])
    if divisor is not None:
        out.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return out
