"""Model-based clustering (MBC) of experts by their LoRA weights, as mttl does it.

Recipe (mttl's SVDEmbeddingTransform and clustering script): flatten each expert's A and B
factors of every module into one vector, zero the entries at or below the expert's own
magnitude quantile (0.5 in the paper's run), embed with TruncatedSVD (64 dims, or N - 1 for
a small library), L2-normalise, take the cosine-similarity matrix S (N, N) and run KMeans
(k-means++, n_init=10) on the ROWS of S. The paper uses k = 10 and retrains one expert per
cluster on the union of its tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from lorafuse.errors import LorafuseError
from lorafuse.library import ExpertLibrary


@dataclass
class Clustering:
    """Result of `mbc_cluster`."""

    labels: np.ndarray  # (N,) cluster of each expert, numbered by first appearance
    similarity: np.ndarray  # (N, N) cosine similarity of the expert embeddings
    clusters: list[list[int]]  # expert indices of each cluster, cluster 0 first
    embeddings: np.ndarray  # (N, C) L2-normalised SVD embeddings


def expert_vectors(source) -> np.ndarray:
    """Each expert's factors flattened into one row: (N, P), modules in sorted name order.

    `source` is an ExpertLibrary or a mapping module name -> (A (N, R, D), B (N, O, R)) (or
    objects with `.A` and `.B`). The result is float64 when any factor is, else float32.
    Raises LorafuseError for an empty source or modules that disagree on N.
    """
    factors = _factors(source)
    N = {int(t.shape[0]) for pair in factors.values() for t in pair}
    if len(N) != 1:
        raise LorafuseError(f"modules disagree on the number of experts: {sorted(N)}")
    n = N.pop()
    f64 = any(t.dtype == torch.float64 for pair in factors.values() for t in pair)
    parts = [t.detach().reshape(n, -1) for name in sorted(factors) for t in factors[name]]
    X = torch.cat([p.to("cpu", torch.float64 if f64 else torch.float32) for p in parts], 1)
    return X.numpy()  # (N, P)


def similarity_matrix(
    X, sparsity: float = 0.5, n_components: int = 64, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """mttl's expert similarity from flattened experts X (N, P): returns (S (N, N), E (N, C)).

    Zeroes each row's entries with |x| <= its `sparsity` quantile (none when sparsity is 0),
    embeds with TruncatedSVD to C = min(n_components, N - 1, P) dims (randomized, n_iter 5,
    random_state `seed`), L2-normalises rows (zero rows stay zero) and returns S = E E^T.
    Raises LorafuseError for sparsity outside [0, 1) or n_components < 1.
    """
    from sklearn.decomposition import TruncatedSVD

    if not 0.0 <= sparsity < 1.0:
        raise LorafuseError(f"sparsity={sparsity} must lie in [0, 1), e.g. 0.5 as in mttl")
    if n_components < 1:
        raise LorafuseError(f"n_components={n_components} must be at least 1 (mttl uses 64)")
    X = np.array(X, copy=True)  # (N, P)
    N, P = X.shape
    if sparsity > 0:
        thr = np.quantile(np.abs(X), sparsity, axis=1)  # (N,)
        X[np.abs(X) <= thr[:, None]] = 0.0
    C = min(n_components, N - 1, P)
    if C < 1:  # a single expert (or a single parameter): nothing to reduce
        E = X.astype(np.float64)
    else:
        svd = TruncatedSVD(n_components=C, n_iter=5, random_state=seed, tol=0.0)
        E = svd.fit_transform(X).astype(np.float64)  # (N, C)
    norms = np.linalg.norm(E, axis=1, keepdims=True)  # (N, 1)
    E = E / np.where(norms > 0, norms, 1.0)
    return E @ E.T, E


def default_clusters(n_experts: int) -> int:
    """About four experts per cluster, at most 10 (the paper's MBC count)."""
    return max(1, min(10, round(n_experts / 4)))


def mbc_cluster(
    source,
    k: int = 10,
    *,
    sparsity: float = 0.5,
    n_components: int = 64,
    seed: int = 0,
) -> Clustering:
    """Cluster N experts into k groups by the MBC recipe; deterministic for a given seed.

    `source`: an ExpertLibrary or a mapping module name -> (A (N, R, D), B (N, O, R)).
    KMeans(k, init='k-means++', n_init=10, random_state=seed) runs on the rows of the
    similarity matrix; labels are renumbered by first appearance. Raises LorafuseError for
    k < 1 or k > N, and as `expert_vectors` and `similarity_matrix` do.
    """
    from sklearn.cluster import KMeans

    X = expert_vectors(source)  # (N, P)
    N = X.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= N:
        raise LorafuseError(
            f"k={k!r} clusters is impossible for {N} experts; choose an integer in 1..{N}"
        )
    S, E = similarity_matrix(X, sparsity, n_components, seed)
    raw = KMeans(n_clusters=int(k), init="k-means++", n_init=10, random_state=seed).fit_predict(S)
    _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))  # (C,) cluster ids ordered by first expert
    labels = rank[inverse]  # (N,)
    clusters = [np.flatnonzero(labels == c).tolist() for c in range(int(labels.max()) + 1)]
    return Clustering(labels, S, clusters, E)


def _factors(source) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    modules = source.modules if isinstance(source, ExpertLibrary) else source
    if not isinstance(modules, Mapping) or not modules:
        raise LorafuseError(
            "expected an ExpertLibrary or a non-empty mapping module name -> (A, B); "
            f"got {type(source).__name__}"
        )
    out = {}
    for name, value in modules.items():
        pair = (value.A, value.B) if hasattr(value, "A") else tuple(value)
        if len(pair) != 2:
            raise LorafuseError(f"module {name}: expected (A, B), got {len(pair)} tensors")
        out[str(name)] = tuple(torch.as_tensor(t) for t in pair)
    return out
