"""The delta-space merges as public functions, their argument checks, and the METHODS table.

Every method takes the library, the weights (None: uniform 1/N; one vector (N,); or a
mapping module -> (N,), as lorafuse.merge.merge) and `rank`, and returns a
MergedAdapter (scaling 1). `rank` K: each module's merged delta is truncated by SVD to
rank K and the fraction of spectral energy kept is recorded per module (`energy`).
`rank` None ("exact"): each module is exported at the rank of its merged delta, so the
adapter reproduces it up to fp32 rounding; for a sparsified merge that rank is
typically min(O, D), which makes the adapter (O + D) * min(O, D) numbers per module
(twice a dense square matrix) and costs one full (O, D) SVD per module (as does any K).
task-arithmetic and peft-linear never form an (O, D) matrix: their exact export is the
concatenated factors (rank sum_i r_i) or PEFT's summed factors (rank R).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lorafuse.delta_merge.combine import DIVIDE_BY, SIGN_OF, Recipe, module_delta
from lorafuse.errors import LorafuseError
from lorafuse.library import ExpertLibrary
from lorafuse.linalg import truncate_dense, truncate_product
from lorafuse.merge import MergedAdapter, Weights, merged_tasks, resolve_weights


# ---- the methods ---------------------------------------------------------------------
def task_arithmetic(
    library: ExpertLibrary,
    weights: Weights = None,
    *,
    normalize: bool = False,
    rank: int | None = None,
) -> MergedAdapter:
    """dW = sum_i w_i s_i B_i A_i (weights need not sum to 1); `normalize` divides by sum_i w_i.

    normalize=False is mergekit's task_arithmetic and PEFT's `svd`/`cat`; normalize=True
    is mergekit's linear. Folded from the factors, no (O, D) matrix: exact at rank
    sum_i r_i (min(O, D) if smaller, through the factors' QR), or truncated to `rank`.
    Raises LorafuseError for bad weights (and weights summing to 0 with normalize) or rank.
    """
    per_module = _weights(library, weights, normalize)
    _check_rank(rank)
    modules, energy = {}, {}
    for name, mod in library.modules.items():
        A, B = mod.fold(per_module[name], "deltas")  # (M, D), (O, M)
        if rank is not None:
            B, A, energy[name] = truncate_product(B, A, rank)
        elif A.shape[0] > min(A.shape[1], B.shape[0]):  # more columns than the rank can be
            B, A, _ = truncate_product(B, A, min(A.shape[1], B.shape[0]))
        modules[name] = (A, B)
    options = {"normalize": normalize}
    return _adapter(library, modules, energy, weights, per_module, "task-arithmetic", options, rank)


def ties(
    library: ExpertLibrary,
    weights: Weights = None,
    *,
    density: float = 0.2,
    sign_of: str = "deltas",
    divide_by: str = "count",
    rank: int | None = None,
) -> MergedAdapter:
    """TIES: trim each dW_i to its top `density` magnitudes, elect a sign, disjoint mean.

    Defaults are PEFT's `ties_svd` (and the TIES paper with lambda = w): the sign per
    entry is that of sum_i trim(dW_i), and the agreeing w_i trim(dW_i) are summed and
    divided by how many agree. sign_of="weighted", divide_by="weights" is mergekit's
    ties (votes w_i trim(dW_i), divides by the agreeing weights). Raises LorafuseError
    for density outside (0, 1], an unknown sign_of / divide_by, bad weights or rank.
    """
    _check_density(density)
    recipe = Recipe(
        "magnitude", density=density, consensus=True, sign_of=sign_of, divide_by=divide_by
    )
    options = {"density": density, "sign_of": sign_of, "divide_by": divide_by}
    return _dense(library, weights, recipe, rank, "ties", options)


def dare_linear(
    library: ExpertLibrary,
    weights: Weights = None,
    *,
    drop: float = 0.9,
    seed: int = 0,
    normalize: bool = False,
    rank: int | None = None,
) -> MergedAdapter:
    """DARE: drop each entry of each dW_i with rate `drop`, rescale by 1/(1-drop), sum w_i.

    PEFT's `dare_linear_svd` and mergekit's dare_linear with density = 1 - drop (they
    draw their masks from the global RNG; lorafuse from a generator per (seed, module,
    expert)). Raises LorafuseError for drop outside [0, 1), bad weights or rank.
    """
    _check_drop(drop)
    recipe = Recipe("random", drop=drop, seed=seed)
    options = {"drop": drop, "seed": seed, "normalize": normalize}
    return _dense(library, weights, recipe, rank, "dare-linear", options, normalize)


def dare_ties(
    library: ExpertLibrary,
    weights: Weights = None,
    *,
    drop: float = 0.9,
    seed: int = 0,
    sign_of: str = "deltas",
    divide_by: str = "count",
    rank: int | None = None,
) -> MergedAdapter:
    """DARE's drop and rescale on each dW_i, then TIES' sign election and disjoint merge.

    Defaults are PEFT's `dare_ties_svd`; sign_of="weighted", divide_by="none" is
    mergekit's dare_ties (its normalize defaults to false). Raises LorafuseError for
    drop outside [0, 1), an unknown sign_of / divide_by, bad weights or rank.
    """
    _check_drop(drop)
    recipe = Recipe(
        "random", drop=drop, seed=seed, consensus=True, sign_of=sign_of, divide_by=divide_by
    )
    options = {"drop": drop, "seed": seed, "sign_of": sign_of, "divide_by": divide_by}
    return _dense(library, weights, recipe, rank, "dare-ties", options)


def magnitude_prune(
    library: ExpertLibrary,
    weights: Weights = None,
    *,
    density: float = 0.2,
    normalize: bool = False,
    rank: int | None = None,
) -> MergedAdapter:
    """sum_i w_i trim(dW_i): each delta keeps its top `density` magnitudes (no election).

    PEFT's `magnitude_prune_svd`. Raises LorafuseError for density outside (0, 1], bad
    weights or rank.
    """
    _check_density(density)
    recipe = Recipe("magnitude", density=density)
    options = {"density": density, "normalize": normalize}
    return _dense(library, weights, recipe, rank, "magnitude-prune", options, normalize)


def breadcrumbs(
    library: ExpertLibrary,
    weights: Weights = None,
    *,
    density: float = 0.9,
    gamma: float = 0.01,
    normalize: bool = False,
    rank: int | None = None,
) -> MergedAdapter:
    """Model Breadcrumbs: drop each dW_i's `gamma` largest magnitudes, keep the next `density`.

    Then sum_i w_i (mergekit's breadcrumbs, whose normalize defaults to false; PEFT has
    none). Raises LorafuseError for density outside (0, 1], gamma outside [0, 1) or
    density + gamma > 1, bad weights or rank.
    """
    _check_density(density)
    if not (0.0 <= _number(gamma) < 1.0) or density + gamma > 1.0:
        raise LorafuseError(
            f"--gamma must be in [0, 1) with density + gamma <= 1 (the largest gamma and the "
            f"next density of the entries); got gamma={gamma}, density={density}"
        )
    recipe = Recipe("magnitude", density=density, gamma=gamma)
    options = {"density": density, "gamma": gamma, "normalize": normalize}
    return _dense(library, weights, recipe, rank, "breadcrumbs", options, normalize)


def peft_linear(
    library: ExpertLibrary, weights: Weights = None, *, rank: int | None = None
) -> MergedAdapter:
    """PEFT's `linear`: the factors summed with sqrt(|w_i s_i|), the sign on A's side.

    B* = sum_i sqrt(|w_i s_i|) B_i and A* = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i.
    Not sum_i w_i dW_i (its cross terms B_i A_j stay) and not the paper's factors merge
    (sum_i w_i s_i B_i)(sum_i w_i A_i). PEFT needs equal ranks; here lower-rank experts
    are zero-padded to R. Exact at rank R, or truncated to `rank`. Raises LorafuseError
    for bad weights or rank.
    """
    per_module = _weights(library, weights, False)
    _check_rank(rank)
    modules, energy = {}, {}
    for name, mod in library.modules.items():
        ws = per_module[name] * mod.scale  # (N,)
        root = ws.abs().sqrt()  # (N,)
        A = torch.einsum("n,nrd->rd", root * torch.sign(ws), mod.A.float())  # (R, D)
        B = torch.einsum("n,nor->or", root, mod.B.float())  # (O, R)
        if rank is not None:
            B, A, energy[name] = truncate_product(B, A, rank)
        modules[name] = (A, B)
    return _adapter(
        library, modules, energy, weights, per_module, "peft-linear", {}, rank, "factors"
    )


METHODS: dict[str, Callable[..., MergedAdapter]] = {
    "task-arithmetic": task_arithmetic,
    "ties": ties,
    "dare-linear": dare_linear,
    "dare-ties": dare_ties,
    "magnitude-prune": magnitude_prune,
    "breadcrumbs": breadcrumbs,
    "peft-linear": peft_linear,
}


def delta_merge(
    library: ExpertLibrary, method: str, weights: Weights = None, rank=None, **options: Any
) -> MergedAdapter:
    """Merge with the named method of METHODS, passing `options` (density, drop, seed, ...).

    Raises LorafuseError for an unknown method or an option the method does not take,
    and whatever the method raises.
    """
    if method not in METHODS:
        raise LorafuseError(f"unknown merge method {method!r}; choose one of {sorted(METHODS)}")
    fn = METHODS[method]
    takes = set(fn.__kwdefaults__ or {}) - {"rank"}
    extra = sorted(set(options) - takes)
    if extra:
        raise LorafuseError(
            f"merge method {method!r} takes no option {extra}; it takes {sorted(takes)}"
        )
    return fn(library, weights, rank=rank, **options)


# ---- shared steps ----------------------------------------------------------------------
def _dense(library, weights, recipe: Recipe, rank, method, options, normalize=False):
    # The sparsifying merges: one dense merged delta per module, exported by SVD.
    if recipe.consensus:
        _check_choice(recipe.sign_of, SIGN_OF, "sign_of")
        _check_choice(recipe.divide_by, DIVIDE_BY, "divide_by")
    per_module = _weights(library, weights, normalize)
    _check_rank(rank)
    modules, energy = {}, {}
    for name, mod in library.modules.items():
        dW = module_delta(mod, per_module[name], recipe, name, library.names)  # (O, D)
        B, A, kept = truncate_dense(dW, rank)
        del dW
        modules[name] = (A, B)
        if kept is not None:
            energy[name] = kept
    return _adapter(library, modules, energy, weights, per_module, method, options, rank)


def _adapter(library, modules, energy, weights, per_module, method, options, rank, space="deltas"):
    first = next(iter(library.modules.values()))
    mapping = isinstance(weights, Mapping)
    meta = {
        "merged_from": library.names,
        "space": space,
        "merge_method": method,
        "options": options,
        "rank": rank,
        "weights": (
            {m: w.tolist() for m, w in per_module.items()}
            if mapping
            else next(iter(per_module.values())).tolist()
        ),
        "tasks": merged_tasks(library, per_module),
    }
    return MergedAdapter(
        modules,
        space,
        first.fan_in_fan_out,
        library.base_model,
        energy=energy if rank is not None else None,
        meta=meta,
    )


def _weights(library: ExpertLibrary, weights: Weights, normalize: bool) -> dict[str, Tensor]:
    # Per-module (N,) vectors, checked (count, finite, not all zero) and normalised.
    per_module = resolve_weights(library, weights)
    for name, w in per_module.items():
        where = f" for module {name}" if isinstance(weights, Mapping) else ""
        if not bool((w != 0).any()):
            raise LorafuseError(
                f"merge weights{where} are all zero ({w.tolist()}): nothing to merge; give at "
                "least one expert a non-zero weight"
            )
        if normalize:
            total = float(w.sum())
            if abs(total) < 1e-8:
                raise LorafuseError(
                    f"cannot normalise merge weights{where} that sum to {total:g} "
                    f"({w.tolist()}); drop --normalize or change the weights"
                )
            per_module[name] = w / total
    return per_module


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")  # fails every range check below


def _check_density(density: float) -> None:
    if not (0.0 < _number(density) <= 1.0):
        raise LorafuseError(
            f"--density must be in (0, 1] (the fraction of each expert's delta kept); got {density}"
        )


def _check_drop(drop: float) -> None:
    if not (0.0 <= _number(drop) < 1.0):
        raise LorafuseError(
            f"--drop must be in [0, 1) (the fraction of each expert's delta dropped); got {drop}"
        )


def _check_rank(rank) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LorafuseError(f"--rank must be a positive integer; got {rank}")


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise LorafuseError(f"{what} must be one of {list(choices)}; got {value!r}")
