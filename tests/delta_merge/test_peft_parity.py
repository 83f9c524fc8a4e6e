"""Each delta merge equals PEFT's add_weighted_adapter of the same name on random adapters.

PEFT's `_svd` forms build each dW_i, combine them and truncate by SVD, as lorafuse does;
with svd_rank = min(O, D) (32 on the pico models) their result is exact. PEFT's svd_rank
cannot exceed the smallest module's min(O, D) (16 on the pico Llama's k_proj), so the
exact comparisons take the combined delta PEFT hands to its SVD, and the rank-K ones
PEFT's adapter itself. DARE draws its masks from PEFT's global RNG, so its parity runs
with PEFT's random_pruning replaced by lorafuse's masks; the masks themselves are
tested as properties in test_dare.py.
"""

from __future__ import annotations

import pytest
import torch

from lorafuse.delta_merge import delta_merge
from lorafuse.delta_merge.sparsify import generator_for, random_drop
from lorafuse.library import ExpertLibrary
from tests.delta_merge.conftest import assert_deltas_close, peft_merged, peft_model, products

WEIGHTS = [0.7, -0.3, 0.5, 0.2]  # one negative: signs must go where PEFT puts them
K = 3  # the rank-K comparisons

EXACT = {"before_svd": True}  # compare with the delta PEFT hands to its SVD
CASES = [  # (lorafuse method, its options, PEFT combination_type, PEFT's keywords)
    ("task-arithmetic", {}, "cat", {}),
    ("task-arithmetic", {}, "svd", EXACT),
    ("ties", {"density": 0.3}, "ties_svd", {"density": 0.3, **EXACT}),
    ("ties", {"density": 1.0}, "ties_svd", {"density": 1.0, **EXACT}),
    ("magnitude-prune", {"density": 0.4}, "magnitude_prune_svd", {"density": 0.4, **EXACT}),
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request):
    """(library, expert folders, a PeftModel holding them) for one architecture."""
    base_dir = request.getfixturevalue(f"{request.param}_dir")
    dirs = request.getfixturevalue(f"{request.param}_experts")
    return ExpertLibrary.load(dirs), dirs, peft_model(base_dir, dirs)


@pytest.mark.parametrize(("method", "options", "combination", "peft_kw"), CASES)
def test_equals_peft_exactly(setup, method, options, combination, peft_kw):
    lib, _, model = setup
    weights = WEIGHTS[: len(lib)]
    ours = delta_merge(lib, method, weights, **options)
    assert ours.energy is None  # exact export
    assert_deltas_close(products(ours), peft_merged(model, weights, combination, **peft_kw))


@pytest.mark.parametrize("method", ["task-arithmetic", "ties"])
def test_rank_k_equals_peft_and_records_energy(setup, method):
    lib, _, model = setup
    weights = WEIGHTS[: len(lib)]
    options = {"density": 0.3} if method == "ties" else {}
    combination = {"ties": "ties_svd", "task-arithmetic": "svd"}[method]
    ours = delta_merge(lib, method, weights, rank=K, **options)
    ref = peft_merged(model, weights, combination, svd_rank=K, **options)
    assert_deltas_close(products(ours), ref, rtol=1e-3)
    exact = products(delta_merge(lib, method, weights, **options))
    for name, dW in exact.items():
        S = torch.linalg.svdvals(dW.double())
        kept = float((S[:K] ** 2).sum() / (S**2).sum())
        assert ours.energy[name] == pytest.approx(kept, rel=1e-5)
        assert ours.modules[name][0].shape[0] == K
    assert 0 < ours.min_energy() < 1


def test_peft_linear_equals_peft(setup):
    lib, _, model = setup
    sub = lib.subset([0, 2])  # PEFT's linear needs equal ranks: both r=4, scalings differ
    assert len(set(sub.modules[next(iter(sub.modules))].scale.tolist())) == 2
    weights = [0.7, -0.3]
    ref = peft_merged(model, weights, "linear", adapters=["e0", "e2"])
    ours = delta_merge(sub, "peft-linear", weights)
    assert ours.rank == 4 and ours.space == "factors"
    assert_deltas_close(products(ours), ref)
    # ... and it is not the weighted sum of the deltas (the cross terms B_i A_j stay)
    plain = products(delta_merge(sub, "task-arithmetic", weights))
    name = next(iter(ref))
    assert (plain[name] - ref[name]).abs().max() > 1e-3 * ref[name].abs().max()


@pytest.mark.parametrize(
    ("method", "combination", "options"),
    [("dare-linear", "dare_linear_svd", {}), ("dare-ties", "dare_ties_svd", {})],
)
def test_dare_equals_peft_given_the_same_masks(setup, monkeypatch, method, combination, options):
    from peft.utils import merge_utils

    lib, _, model = setup
    weights, drop, seed = WEIGHTS[: len(lib)], 0.6, 11
    candidates = []  # (module, expert, its delta (O, D)) to recognise PEFT's calls by value
    for name, mod in lib.modules.items():
        for i, r in enumerate(mod.rank.tolist()):
            candidates.append((name, lib.names[i], mod.B[i, :, :r] @ mod.A[i, :r] * mod.scale[i]))
    calls = []

    def our_masks(tensor, density, rescale):  # PEFT's signature; lorafuse's mask
        assert rescale and density == pytest.approx(1 - drop)
        for name, expert, dW in candidates:
            for flip in (False, True):
                ref = dW.T if flip else dW
                if ref.shape == tensor.shape and torch.allclose(ref, tensor, atol=1e-6):
                    calls.append((name, expert))
                    t = tensor.detach().clone()
                    t = t.T.contiguous() if flip else t
                    out = random_drop(t, drop, generator_for(seed, name, expert))
                    return out.T if flip else out
        raise AssertionError("PEFT pruned a delta that is no expert's")

    monkeypatch.setattr(merge_utils, "random_pruning", our_masks)
    ref = peft_merged(model, weights, combination, density=1 - drop, before_svd=True)
    assert len(calls) == len(lib) * len(lib.modules)
    ours = delta_merge(lib, method, weights, drop=drop, seed=seed, **options)
    assert_deltas_close(products(ours), ref)
