"""Hierarchical-clustering routing (paper Section 5.3): route over merged cluster experts.

The N experts are grouped into C clusters (no retraining). Within cluster c the experts
are merged with learned input-independent weights w (softmax over the cluster's members);
a per-token router r(x) (B, T, C) mixes the merged cluster experts. As coefficients over
the N experts this is l_i(x) = r_{c(i)}(x) * w_i, which in the factors space is exactly
routing over the merged experts (sum_c r_c sum_{i in c} w_i A_i = sum_c r_c Abar_c).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorafuse.errors import LorafuseError
from lorafuse.factors import StackedModule
from lorafuse.mixers.routers import LinearRouter, arrow_prototypes


def within_cluster_softmax(theta: Tensor, labels: Tensor, clusters: int) -> Tensor:
    """softmax of theta (N,) within each cluster: (N,), each cluster's weights sum to 1."""
    e = (theta - theta.max()).exp()  # (N,)
    totals = torch.zeros(clusters, dtype=e.dtype, device=e.device).index_add(0, labels, e)
    return e / totals[labels]  # (N,)


def merged_clusters(stacked: StackedModule, labels: Tensor, clusters: int) -> StackedModule:
    """The uniform merge of each cluster's experts (factors space): C merged experts."""
    members = torch.nn.functional.one_hot(labels, clusters).T.float()  # (C, N)
    A, B = stacked.fold_factors(members / members.sum(1, keepdim=True))  # (C, R, D), (C, O, R)
    rank = torch.zeros(clusters, dtype=torch.long).scatter_reduce(
        0, labels, stacked.rank, reduce="amax"
    )  # (C,)
    dtype = stacked.A.dtype
    return StackedModule(A.to(dtype), B.to(dtype), torch.ones(clusters), rank)


class HCRouter(nn.Module):
    """Coefficients (B, T, N) = router over clusters (B, T, C) times within-cluster weights.

    `labels` (N,) assigns each expert a cluster 0..C-1. `init` (C, D): Arrow prototypes of
    the merged cluster experts (route-arrow-hc), else a uniform start. `top_k` keeps the k
    largest cluster coefficients at inference. Raises LorafuseError for bad labels.
    """

    def __init__(
        self,
        in_features: int,
        labels: Tensor,
        init: Tensor | None = None,
        top_k: int | None = None,
    ):
        super().__init__()
        labels = torch.as_tensor(labels, dtype=torch.long)
        C = int(labels.max()) + 1 if labels.numel() else 0
        if labels.dim() != 1 or sorted(set(labels.tolist())) != list(range(C)):
            raise LorafuseError(f"cluster labels must cover 0..C-1 with no gap; got {labels}")
        self.register_buffer("labels", labels, persistent=False)
        self.num_experts, self.num_clusters = labels.numel(), C
        self.theta = nn.Parameter(torch.zeros(labels.numel()))  # (N,): uniform in clusters
        self.router = LinearRouter(in_features, C, init=init, top_k=top_k)

    def within(self) -> Tensor:
        """The within-cluster merge weights (N,)."""
        return within_cluster_softmax(self.theta, self.labels, self.num_clusters)

    def forward(self, x: Tensor) -> Tensor:
        r = self.router(x)  # (B, T, C)
        return r[..., self.labels] * self.within()  # (B, T, N)


def build_hc_routers(
    library, device: torch.device | str, labels: Tensor, arrow_init: bool = False
) -> dict[str, HCRouter]:
    """One HCRouter per module of `library` (module path -> router), on `device`.

    `labels` (N,) is each expert's cluster; with `arrow_init` the routers start from the
    Arrow prototypes of the uniformly merged clusters. Set them on a fusion of the same
    library with `fusion.set_mixers(routers)`.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    C = int(labels.max()) + 1
    routers = {}
    for name, stacked in library.modules.items():
        init = arrow_prototypes(merged_clusters(stacked, labels, C)) if arrow_init else None
        D = stacked.shape[2]
        routers[name] = HCRouter(D, labels, init).to(device)
    return routers
