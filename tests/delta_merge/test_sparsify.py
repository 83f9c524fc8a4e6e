"""One delta's sparsifiers: magnitude bands against a sort, random drops as properties."""

from __future__ import annotations

import pytest
import torch

from lorafuse.delta_merge.sparsify import generator_for, keep_band, magnitude_band, random_drop


def random_delta(shape=(100, 37), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("density", "gamma"), [(0.2, 0.0), (0.5, 0.0), (0.7, 0.1), (0.3, 0.7)])
def test_band_keeps_the_ranked_entries(density, gamma):
    t = random_delta()
    n = t.numel()
    kept = keep_band(t.clone(), magnitude_band(t, density, gamma))
    order = t.abs().flatten().argsort(descending=True)  # largest first
    top, k = int(gamma * n), int(density * n)
    expected = torch.zeros(n, dtype=torch.bool)
    expected[order[top : top + k]] = True
    assert torch.equal(kept.flatten() != 0, expected)
    assert torch.equal(kept.flatten()[expected], t.flatten()[expected])  # values untouched


def test_band_edges():
    t = random_delta()
    assert keep_band(t, magnitude_band(t, 1.0)) is t  # density 1: nothing to do
    assert torch.equal(keep_band(t.clone(), magnitude_band(t, 1.0)), t)
    assert keep_band(t.clone(), magnitude_band(t, 1e-6)).count_nonzero() == 0  # k = 0


def test_random_drop_keeps_one_minus_p_and_rescales():
    t = random_delta((512, 512))
    p = 0.7
    out = random_drop(t.clone(), p, torch.Generator().manual_seed(3))
    kept = out != 0
    sigma = (p * (1 - p) / t.numel()) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma
    torch.testing.assert_close(out[kept], t[kept] / (1 - p))
    again = random_drop(t.clone(), p, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # the same generator state, the same mask
    assert random_drop(t, 0.0, torch.Generator()) is t  # p = 0: untouched


def test_generator_for_is_a_function_of_seed_module_expert():
    def draw(*key):
        return torch.rand(8, generator=generator_for(*key))

    assert torch.equal(draw(1, "m", "e"), draw(1, "m", "e"))
    for other in [(2, "m", "e"), (1, "n", "e"), (1, "m", "f")]:
        assert not torch.equal(draw(1, "m", "e"), draw(*other))
