"""The public methods: the METHODS table, bad input named, layer-wise weights, export."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel

from lorafuse.delta_merge import METHODS, delta_merge, ties
from lorafuse.errors import LorafuseError
from lorafuse.library import ExpertLibrary
from lorafuse.merge import merged_state_dict, save_adapter
from tests.conftest import load_base
from tests.delta_merge.conftest import products

WEIGHTS = [0.7, -0.3, 0.5, 0.2]


@pytest.fixture(scope="module")
def lib(llama_experts):
    return ExpertLibrary.load(llama_experts)


def test_the_table_names_every_method():
    assert sorted(METHODS) == sorted(
        ["task-arithmetic", "ties", "dare-linear", "dare-ties", "magnitude-prune", "breadcrumbs"]
        + ["peft-linear"]
    )
    assert METHODS["ties"] is ties


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("ties", {"density": 0.0}, r"--density must be in \(0, 1\].*got 0.0"),
        ("ties", {"density": 1.5}, "got 1.5"),
        ("magnitude-prune", {"density": math.nan}, "got nan"),
        ("breadcrumbs", {"density": -0.1}, "got -0.1"),
        ("breadcrumbs", {"density": 0.9, "gamma": 0.2}, "gamma=0.2, density=0.9"),
        ("dare-linear", {"drop": 1.0}, r"--drop must be in \[0, 1\).*got 1.0"),
        ("dare-ties", {"drop": -0.1}, "got -0.1"),
        ("ties", {"sign_of": "votes"}, "sign_of must be one of.*'votes'"),
        ("dare-ties", {"divide_by": "mean"}, "divide_by must be one of.*'mean'"),
        ("ties", {"drop": 0.5}, r"takes no option \['drop'\]"),
        ("task-arithmetic", {"rank": 0}, "positive integer; got 0"),
        ("ties", {"rank": 2.5}, "positive integer; got 2.5"),
        ("merge-ties", {}, "unknown merge method 'merge-ties'"),
    ],
)
def test_bad_options_are_named(lib, method, options, message):
    with pytest.raises(LorafuseError, match=message):
        delta_merge(lib, method, WEIGHTS, **options)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([0.5, 0.5], r"4 numbers \(one per expert\); got \[0.5, 0.5\]"),
        ([0.1, math.nan, 0.2, 0.3], "NaN or Inf"),
        ([0.1, math.inf, 0.2, 0.3], "NaN or Inf"),
        ([0.0, 0.0, 0.0, 0.0], r"all zero \(\[0.0, 0.0, 0.0, 0.0\]\)"),
    ],
)
def test_bad_weights_are_named(lib, method, weights, message):
    with pytest.raises(LorafuseError, match=message):
        delta_merge(lib, method, weights)


def test_all_zero_for_one_module_names_it(lib):
    per_layer = {m: torch.tensor(WEIGHTS) for m in lib.modules}
    name = sorted(lib.modules)[3]
    per_layer[name] = torch.zeros(4)
    with pytest.raises(LorafuseError, match=f"for module {name} are all zero"):
        delta_merge(lib, "ties", per_layer)


@pytest.mark.parametrize("method", ["task-arithmetic", "dare-linear", "magnitude-prune"])
def test_normalize_refuses_weights_summing_to_zero(lib, method):
    with pytest.raises(LorafuseError, match="sum to 0"):
        delta_merge(lib, method, [0.5, -0.5, 0.0, 0.0], normalize=True)


def test_layer_wise_weights_merge_each_module_with_its_own(lib):
    names = sorted(lib.modules)
    per_layer = {
        m: torch.tensor(WEIGHTS if i % 2 else [0.1, 0.2, 0.3, 0.4]) for i, m in enumerate(names)
    }
    mixed = products(delta_merge(lib, "ties", per_layer, density=0.5))
    odd = products(delta_merge(lib, "ties", WEIGHTS, density=0.5))
    even = products(delta_merge(lib, "ties", [0.1, 0.2, 0.3, 0.4], density=0.5))
    for i, m in enumerate(names):
        torch.testing.assert_close(mixed[m], (odd if i % 2 else even)[m])


def test_exact_rank_and_meta(lib):
    dense = delta_merge(lib, "ties", WEIGHTS, density=0.3)
    q = "model.layers.0.self_attn.q_proj"
    A, B = dense.modules[q]
    assert A.shape == (32, 32) and B.shape == (32, 32)  # a sparse merge is full rank
    low = delta_merge(lib, "task-arithmetic", WEIGHTS)
    assert low.modules[q][0].shape[0] == int(lib.modules[q].rank.sum())  # concatenated
    assert dense.energy is None and dense.meta["merge_method"] == "ties"
    assert dense.meta["options"] == {"density": 0.3, "sign_of": "deltas", "divide_by": "count"}
    assert dense.meta["weights"] == pytest.approx(WEIGHTS)
    skip = delta_merge(lib, "magnitude-prune", [0.5, 0.0, 0.5, 0.0])
    assert skip.meta["merged_from"] == lib.names and skip.space == "deltas"


def test_saved_adapter_reproduces_the_merged_model(lib, llama_dir, tokens, tmp_path):
    merged = delta_merge(lib, "ties", WEIGHTS, density=0.3)  # mixed exact ranks, zero-padded
    save_adapter(merged, tmp_path / "ties")
    adapter = PeftModel.from_pretrained(load_base(llama_dir), tmp_path / "ties").eval()
    full = load_base(llama_dir)
    full.load_state_dict(merged_state_dict(full, merged))
    assert (adapter(tokens).logits - full(tokens).logits).abs().max() <= 1e-4


def test_task_arithmetic_exact_rank_stops_at_min_o_d():
    """More summed ranks than min(O, D): the exact export has rank min(O, D), same delta."""
    from lorafuse.factors import StackedModule
    from lorafuse.library import Expert

    g = torch.Generator().manual_seed(0)
    N, R, D, O = 6, 4, 10, 8
    mod = StackedModule(
        A=torch.randn(N, R, D, generator=g),
        B=torch.randn(N, O, R, generator=g),
        scale=torch.rand(N, generator=g) + 0.5,
        rank=torch.full((N,), R),
    )
    small = ExpertLibrary([Expert(f"x{i}") for i in range(N)], {"m": mod})
    w = torch.rand(N, generator=g) - 0.3
    merged = delta_merge(small, "task-arithmetic", w)
    A, B = merged.modules["m"]
    assert A.shape == (O, D) and B.shape == (O, O)
    ref = torch.einsum("n,nor,nrd->od", w * mod.scale, mod.B, mod.A)
    torch.testing.assert_close(B @ A, ref, atol=1e-5, rtol=1e-5)
