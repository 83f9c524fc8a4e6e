"""Expert selection: greedy task-level subsets and MBC clustering of the library."""

from lorafuse.select.clustering import (
    Clustering,
    expert_vectors,
    mbc_cluster,
    similarity_matrix,
)
from lorafuse.select.greedy import (
    GreedySelection,
    greedy_select,
    not_best_on_own_task,
    private_oracle_loss,
)

__all__ = [
    "Clustering",
    "GreedySelection",
    "expert_vectors",
    "greedy_select",
    "mbc_cluster",
    "not_best_on_own_task",
    "private_oracle_loss",
    "similarity_matrix",
]
