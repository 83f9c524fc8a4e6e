"""How coefficients are learned from cached evaluations: exact ensemble fits and the LP."""

from lorafuse.fit.exact import (
    EnsembleFit,
    SparseEnsemble,
    ensemble_objective,
    fit_ensemble,
    sparse_greedy,
)
from lorafuse.fit.minimax import MinimaxFit, fit_minimax

__all__ = [
    "EnsembleFit",
    "MinimaxFit",
    "SparseEnsemble",
    "ensemble_objective",
    "fit_ensemble",
    "fit_minimax",
    "sparse_greedy",
]
