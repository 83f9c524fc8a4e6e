"""Gradient-free search of a bounded vector under a budget of evaluations (CMA-ES).

LoraHub's setting: minimise f(x) over the box [-bound, bound]^n with no gradient, each
evaluation of f counted as one pass. The optimizer is CMA-ES from the `cma` package
(optional extra `lorafuse[search]`): one small numpy-only dependency, seeded, with box
bounds built in (nevergrad, LoraHub's choice, pulls in a larger stack for the same job).

The start x0 is evaluated first, so the result is never worse than the start; then whole
generations of `popsize` candidates are evaluated while the budget allows (so at most
`max_passes` evaluations). When the search stops (`SearchResult.stop`):
- "plateau": `patience` generations in a row did not improve the best value by more than
  `min_delta` of it (relative, as the SGD loop's rule); counts as converged;
- "cma: <criterion>": CMA-ES stopped on its own criterion (tolfun, tolx, ...); converged;
- "pass budget": the next generation would exceed `max_passes`; not converged.
numpy's global random state, which cma draws from, is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lorafuse.errors import LorafuseError

PLATEAU, BUDGET = "plateau", "pass budget"
INSTALL = "pip install 'lorafuse[search]'"


@dataclass
class SearchSettings:
    """Settings of one search (saved with its result)."""

    max_passes: int = 200  # evaluations of f, the start's included
    popsize: int | None = None  # candidates per generation (None: cma's 4 + 3 ln n)
    sigma: float = 0.1  # initial step size
    bound: float = 1.5  # every coordinate in [-bound, bound]
    seed: int = 0
    patience: int | None = 3  # generations without improvement before stopping
    min_delta: float = 1e-3  # relative improvement a generation must make to count


@dataclass
class SearchResult:
    """The best point, its value, the start's value, and how the search went."""

    x: list[float]
    value: float
    start_value: float
    passes: int
    generations: int
    popsize: int
    stop: str
    history: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        """True when it stopped on a plateau or a CMA-ES criterion, not on the budget."""
        return self.stop != BUDGET

    def summary(self) -> dict[str, Any]:
        """What a fit records: best value, start value, passes, generations, stop, converged."""
        return {
            "objective": self.value,
            "start_objective": self.start_value,
            "passes": self.passes,
            "generations": self.generations,
            "popsize": self.popsize,
            "stop": self.stop,
            "converged": self.converged,
        }


def require_cma():
    """The `cma` module; LorafuseError saying how to install it when it is missing."""
    try:
        import cma
    except ImportError:
        raise LorafuseError(
            f"the gradient-free search needs the `cma` package (CMA-ES): {INSTALL}"
        ) from None
    return cma


def cma_search(
    f: Callable[[np.ndarray], float], x0: Sequence[float], settings: SearchSettings
) -> SearchResult:
    """Minimise `f` over [-bound, bound]^n from `x0` with CMA-ES, within `max_passes`.

    `f(x)` takes x (n,) and returns a float (NaN or Inf count as +inf). Raises
    LorafuseError when cma is missing, x0 lies outside the bounds, or the budget cannot
    hold the start and one generation.
    """
    cma = require_cma()
    s = settings
    x0 = np.asarray(x0, dtype=float)  # (n,)
    n = x0.size
    popsize = s.popsize or 4 + int(3 * np.log(n))
    if s.bound <= 0 or np.abs(x0).max() > s.bound:
        raise LorafuseError(
            f"the search's start {x0.tolist()} lies outside [-{s.bound}, {s.bound}]"
        )
    if s.max_passes < 1 + popsize:
        raise LorafuseError(
            f"max_passes {s.max_passes} cannot hold the start and one generation of "
            f"{popsize} candidates; give at least {1 + popsize}"
        )
    # cma reads seed 0 as "from the clock": seed + 1 keeps every seed reproducible
    opts = {"bounds": [-s.bound, s.bound], "popsize": popsize, "seed": s.seed + 1,
            "verbose": -9, "verb_log": 0, "verb_disp": 0}  # fmt: skip
    state = np.random.get_state()
    try:
        es = cma.CMAEvolutionStrategy(x0.tolist(), s.sigma, opts)
        best_x, best = x0, _value(f, x0)
        start, passes, generations, stale, stop = best, 1, 0, 0, BUDGET
        history = [{"generation": 0, "passes": 1, "best": best}]
        while passes + popsize <= s.max_passes:
            xs = es.ask()  # popsize points, inside the bounds (cma's BoundTransform)
            values = [_value(f, np.clip(x, -s.bound, s.bound)) for x in xs]
            passes, generations = passes + len(xs), generations + 1
            es.tell(xs, values)
            i = int(np.argmin(values))
            improved = values[i] < best - s.min_delta * abs(best)
            if values[i] < best:
                best_x, best = np.clip(xs[i], -s.bound, s.bound), values[i]
            stale = 0 if improved else stale + 1
            history.append({"generation": generations, "passes": passes, "best": best,
                            "mean": float(np.mean(values))})  # fmt: skip
            if s.patience is not None and stale >= s.patience:
                stop = PLATEAU
                break
            if es.stop():
                stop = "cma: " + ", ".join(sorted(es.stop()))
                break
    finally:
        np.random.set_state(state)
    return SearchResult(
        [float(v) for v in best_x], best, start, passes, generations, popsize, stop, history,
        {**asdict(s), "popsize": popsize},
    )  # fmt: skip


def _value(f, x: np.ndarray) -> float:
    v = float(f(x))
    return v if np.isfinite(v) else float("inf")
