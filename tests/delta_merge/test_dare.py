"""DARE as properties: PEFT and mergekit draw their masks from the global RNG, lorafuse from
a generator per (seed, module, expert), so the masks cannot match theirs; what must hold
is the kept fraction, the rescaling, the expected value and the reproducibility."""

from __future__ import annotations

import pytest
import torch

from lorafuse.delta_merge import dare_linear, dare_ties, delta_merge
from lorafuse.delta_merge.combine import Recipe, module_delta
from lorafuse.library import ExpertLibrary
from tests.delta_merge.conftest import products, stacked_deltas

WEIGHTS = [0.7, -0.3, 0.5, 0.2]


@pytest.fixture(scope="module")
def lib(llama_experts):
    return ExpertLibrary.load(llama_experts)


def test_kept_fraction_and_rescaling(lib):
    p, sub = 0.7, lib.subset([0])
    kept, total = 0, 0
    for name, mod in sub.modules.items():
        out = module_delta(mod, torch.ones(1), Recipe("random", drop=p, seed=2), name, sub.names)
        dW = stacked_deltas(sub, name)[0]  # (O, D)
        mask = out != 0
        torch.testing.assert_close(out[mask], dW[mask] / (1 - p))
        kept, total = kept + int(mask.sum()), total + mask.numel()
    sigma = (p * (1 - p) / total) ** 0.5
    assert abs(kept / total - (1 - p)) < 5 * sigma


def test_expected_value_is_the_weighted_sum(lib):
    """Mean over S seeds -> sum_i w_i dW_i, with the squared error DARE's variance predicts."""
    p, S, name = 0.5, 200, "model.layers.0.mlp.up_proj"
    mod, w = lib.modules[name], torch.tensor(WEIGHTS)
    runs = [
        module_delta(mod, w, Recipe("random", drop=p, seed=s), name, lib.names) for s in range(S)
    ]
    mean = torch.stack(runs).mean(0)  # (O, D)
    deltas = stacked_deltas(lib, name)  # (N, O, D)
    target = torch.einsum("n,nod->od", w, deltas)
    # each entry: Var = sum_i w_i^2 dW_i^2 p / (1 - p), over S independent seeds
    predicted = float((torch.einsum("n,nod->od", w**2, deltas**2) * p / (1 - p) / S).sum())
    ratio = float(((mean - target) ** 2).sum()) / predicted
    assert 0.5 < ratio < 2.0


def test_same_seed_same_merge_other_seed_other(lib):
    a = dare_ties(lib, WEIGHTS, drop=0.5, seed=3)
    b = dare_ties(lib, WEIGHTS, drop=0.5, seed=3)
    c = dare_ties(lib, WEIGHTS, drop=0.5, seed=4)
    for name in lib.modules:
        assert all(torch.equal(x, y) for x, y in zip(a.modules[name], b.modules[name]))
    name = next(iter(lib.modules))
    assert not torch.allclose(products(a)[name], products(c)[name])
    assert a.meta["options"] == {"drop": 0.5, "seed": 3, "sign_of": "deltas", "divide_by": "count"}


def test_an_experts_mask_does_not_depend_on_the_others(lib):
    name = next(iter(lib.modules))
    recipe = Recipe("random", drop=0.5, seed=9)
    alone = module_delta(lib.subset([2]).modules[name], torch.ones(1), recipe, name, ["e2"])
    among = module_delta(lib.modules[name], torch.tensor([0.0, 0, 1, 0]), recipe, name, lib.names)
    assert torch.equal(alone, among)


def test_no_drop_is_the_plain_merge(lib):
    plain = products(delta_merge(lib, "task-arithmetic", WEIGHTS))
    ties_all = products(delta_merge(lib, "ties", WEIGHTS, density=1.0))
    for ours, ref in [
        (dare_linear(lib, WEIGHTS, drop=0.0), plain),
        (dare_ties(lib, WEIGHTS, drop=0.0), ties_all),
    ]:
        for name, dW in products(ours).items():
            torch.testing.assert_close(
                dW, ref[name], atol=1e-5 * float(ref[name].abs().max()), rtol=1e-4
            )
