"""MBC clustering: planted groups, determinism, errors and the recipe computed by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from lorafuse.errors import LorafuseError
from lorafuse.factors import StackedModule
from lorafuse.library import Expert, ExpertLibrary
from lorafuse.select.clustering import expert_vectors, mbc_cluster
from lorafuse.study.figures import plot_similarity


def planted(k: int, per: int, seed: int, noise: float = 0.1):
    """Factors of k * per experts, noisy copies of k prototypes, shuffled; and true groups."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randperm(k * per, generator=g) % k  # (N,)
    shapes = {"layers.0.q_proj": ((2, 8), (6, 2)), "layers.1.up_proj": ((2, 6), (10, 2))}
    factors = {}
    for name, (a_shape, b_shape) in shapes.items():
        proto_a = torch.randn(k, *a_shape, generator=g, dtype=torch.float64)
        proto_b = torch.randn(k, *b_shape, generator=g, dtype=torch.float64)
        A = proto_a[truth] + noise * torch.randn(
            k * per, *a_shape, generator=g, dtype=torch.float64
        )
        B = proto_b[truth] + noise * torch.randn(
            k * per, *b_shape, generator=g, dtype=torch.float64
        )
        factors[name] = (A, B)  # A (N, R, D), B (N, O, R)
    return factors, truth.numpy()


def test_recovers_planted_groups():
    factors, truth = planted(k=4, per=5, seed=0)
    res = mbc_cluster(factors, k=4, seed=0)
    assert adjusted_rand_score(truth, res.labels) == 1.0
    assert sorted(i for c in res.clusters for i in c) == list(range(20))
    assert res.labels[0] == 0  # clusters are numbered by first appearance
    for c, members in enumerate(res.clusters):
        assert (res.labels[members] == c).all()


def test_deterministic_per_seed():
    factors, _ = planted(k=3, per=4, seed=1, noise=1.0)  # noisy: KMeans has choices to make
    a = mbc_cluster(factors, k=5, seed=3)
    b = mbc_cluster(factors, k=5, seed=3)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.similarity, b.similarity)


def test_bad_k_raises():
    factors, _ = planted(k=2, per=3, seed=2)
    for k in (0, 7, -1, 2.5):
        with pytest.raises(LorafuseError, match=f"k={k!r}.*1..6"):
            mbc_cluster(factors, k=k)


def test_similarity_matches_the_recipe_by_hand():
    factors, _ = planted(k=2, per=3, seed=3, noise=0.5)  # N = 6
    res = mbc_cluster(factors, k=2, seed=0)
    rows = [
        t.numpy().reshape(6, -1) for name in sorted(factors) for t in factors[name]
    ]  # A then B of each module, modules in sorted order
    X = np.concatenate(rows, axis=1)  # (N, P)
    for i in range(6):  # each expert: zero entries at or below its median magnitude
        thr = np.quantile(np.abs(X[i]), 0.5)
        X[i, np.abs(X[i]) <= thr] = 0.0
    U, s, _ = np.linalg.svd(X, full_matrices=False)
    E = U[:, :5] * s[:5]  # min(64, N - 1) = 5 dims
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    np.testing.assert_allclose(res.similarity, E @ E.T, atol=1e-8)
    np.testing.assert_allclose(np.diag(res.similarity), 1.0, atol=1e-12)


def test_accepts_an_expert_library():
    factors, truth = planted(k=3, per=3, seed=4)
    N = len(truth)
    modules = {
        name: StackedModule(A=A, B=B, scale=torch.ones(N), rank=torch.full((N,), 2))
        for name, (A, B) in factors.items()
    }
    library = ExpertLibrary([Expert(name=f"e{i}") for i in range(N)], modules)
    np.testing.assert_array_equal(expert_vectors(library), expert_vectors(factors))
    a, b = mbc_cluster(library, k=3), mbc_cluster(factors, k=3)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert adjusted_rand_score(truth, a.labels) == 1.0


def test_tiny_libraries():
    factors, _ = planted(k=1, per=1, seed=5)
    one = mbc_cluster(factors, k=1)
    assert one.labels.tolist() == [0] and one.clusters == [[0]]
    np.testing.assert_allclose(one.similarity, [[1.0]])
    factors, _ = planted(k=2, per=1, seed=6)
    with warnings.catch_warnings():  # 1 SVD dim for 2 experts: their rows of S may coincide
        warnings.simplefilter("ignore")
        two = mbc_cluster(factors, k=2)
    assert two.similarity.shape == (2, 2) and two.embeddings.shape == (2, 1)
    assert two.labels.shape == (2,) and two.labels[0] == 0


def test_plot_is_written(tmp_path):
    factors, _ = planted(k=3, per=3, seed=7)
    res = mbc_cluster(factors, k=3)
    out = plot_similarity(res, tmp_path / "mbc.png", names=[f"task{i}" for i in range(9)])
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_plot_handles_one_expert_and_large_libraries(tmp_path):
    one = mbc_cluster(planted(k=1, per=1, seed=8)[0], k=1)
    assert plot_similarity(one, tmp_path / "one.png", names=["a"]).exists()
    many = mbc_cluster(planted(k=3, per=30, seed=9)[0], k=3)  # 90 experts: no name ticks
    assert plot_similarity(many, tmp_path / "many.png", names=[f"t{i}" for i in range(90)]).exists()
