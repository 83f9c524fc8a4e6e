"""Each delta merge equals mergekit's method of the same name on the same full models.

mergekit is not a dependency: its generalized task arithmetic (mergekit 0.1.5,
merge_methods/generalized_task_arithmetic.py and sparsify.py) is written out below from
its definitions. It merges full models: the task vectors are theta_i - W of each expert
merged into the pico Llama by PEFT's merge_and_unload, and lorafuse's result is folded
into W by merged_state_dict. DARE's masks are lorafuse's (mergekit draws from the
global RNG); everything after the mask is mergekit's.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from lorafuse.delta_merge import delta_merge
from lorafuse.delta_merge.sparsify import generator_for, random_drop
from lorafuse.library import ExpertLibrary
from lorafuse.merge import merged_state_dict
from tests.conftest import load_base

WEIGHTS = [0.7, -0.3, 0.5, 0.2]


# ---- mergekit's formulas, written out ---------------------------------------------------
def mk_magnitude(t, density):
    """Keep the int(density * n) largest |t| (mergekit's `magnitude`)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    keep = t.abs().flatten().argsort(descending=True)[:k]
    mask = torch.zeros(t.numel())
    mask[keep] = 1
    return t * mask.view_as(t)


def mk_outliers(t, density, gamma):
    """Drop the int(gamma * n) largest |t|, keep the next int(density * n)."""
    n = t.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    ascending = t.abs().flatten().argsort()
    mask = torch.zeros(n)
    mask[ascending[bottom : n - top]] = 1
    return t * mask.view_as(t)


def mk_generalized(task_vectors, weights, sparsify=None, consensus=False, normalize=False):
    """mergekit's GTA: sparsify, weight, optional sign consensus (sum), optional normalise."""
    tv = torch.stack([sparsify(t, i) if sparsify else t for i, t in enumerate(task_vectors)])
    w = torch.tensor(weights)[:, None, None]  # (N, 1, 1)
    weighted = tv * w  # (N, O, D)
    if consensus:
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)  # (O, D)
        mask = weighted.sign() == majority  # (N, O, D)
        mixed = (weighted * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    return mixed / divisor if normalize else mixed


# ---- the full models --------------------------------------------------------------------
@pytest.fixture(scope="module")
def full(llama_dir, llama_experts):
    """(library, base state dict, each expert's task vectors module -> theta_i - W)."""
    base = load_base(llama_dir).state_dict()
    vectors = []
    for d in llama_experts:
        merged = PeftModel.from_pretrained(load_base(llama_dir), d).merge_and_unload()
        sd = merged.state_dict()
        vectors.append({k: sd[k] - base[k] for k in base})
    return ExpertLibrary.load(llama_experts), base, vectors


def dare_masks(lib, module, drop, seed):
    """lorafuse's DARE sparsifier for `module` as mergekit's per-expert step."""

    def sparsify(t, i):
        return random_drop(t.clone(), drop, generator_for(seed, module, lib.names[i]))

    return sparsify


CASES = [  # (mergekit method, its GTA settings, lorafuse method, its options)
    ("task_arithmetic", {}, "task-arithmetic", {}),
    ("linear", {"normalize": True}, "task-arithmetic", {"normalize": True}),
    (
        "ties",
        {"sparsify": "magnitude", "consensus": True, "normalize": True},
        "ties",
        {"density": 0.3, "sign_of": "weighted", "divide_by": "weights"},
    ),
    (
        "ties normalize: false",
        {"sparsify": "magnitude", "consensus": True},
        "ties",
        {"density": 0.3, "sign_of": "weighted", "divide_by": "none"},
    ),
    ("breadcrumbs", {"sparsify": "outliers"}, "breadcrumbs", {"density": 0.8, "gamma": 0.05}),
    (
        "dare_ties",
        {"sparsify": "dare", "consensus": True},
        "dare-ties",
        {"drop": 0.6, "seed": 5, "sign_of": "weighted", "divide_by": "none"},
    ),
    ("dare_linear", {"sparsify": "dare"}, "dare-linear", {"drop": 0.6, "seed": 5}),
]


@pytest.mark.parametrize(("mk_name", "mk", "method", "options"), CASES)
def test_equals_mergekit_on_full_models(full, llama_dir, mk_name, mk, method, options):
    lib, base, vectors = full
    ours = merged_state_dict(load_base(llama_dir), delta_merge(lib, method, WEIGHTS, **options))
    for module in lib.modules:
        key = f"{module}.weight"
        kind = mk.get("sparsify")
        sparsify = {
            None: None,
            "magnitude": lambda t, i: mk_magnitude(t, options["density"]),
            "outliers": lambda t, i: mk_outliers(t, options["density"], options["gamma"]),
            "dare": dare_masks(lib, module, options.get("drop", 0), options.get("seed", 0)),
        }[kind]
        task_vectors = [v[key] for v in vectors]
        mixed = mk_generalized(
            task_vectors, WEIGHTS, sparsify, mk.get("consensus", False), mk.get("normalize", False)
        )
        atol = 1e-5 * float(mixed.abs().max())
        torch.testing.assert_close(ours[key], base[key] + mixed, atol=atol, rtol=1e-4, msg=key)
    untouched = [k for k in base if not any(k == f"{m}.weight" for m in lib.modules)]
    assert all(torch.equal(ours[k], base[k]) for k in untouched)


def test_peft_and_mergekit_ties_differ_where_weights_differ(full):
    """The two conventions of `ties` are not the same merge (why sign_of/divide_by exist)."""
    lib, _, _ = full
    peft_style = delta_merge(lib, "ties", WEIGHTS, density=0.3)
    mk_style = delta_merge(
        lib, "ties", WEIGHTS, density=0.3, sign_of="weighted", divide_by="weights"
    )
    name = next(iter(lib.modules))
    (A1, B1), (A2, B2) = peft_style.modules[name], mk_style.modules[name]
    assert (B1 @ A1 - B2 @ A2).abs().max() > 1e-3 * (B1 @ A1).abs().max()
