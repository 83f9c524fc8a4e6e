"""Sparsify one expert's delta dW (O, D) before mixing: magnitude bands and random drops.

- magnitude (TIES' trim, magnitude pruning, Model Breadcrumbs): rank the entries by |dW|,
  drop the `gamma` fraction with the largest magnitudes, keep the next `density`
  fraction, zero the rest. With gamma = 0 this is "keep the top `density` magnitudes"
  (PEFT's and mergekit's `magnitude`: k = int(density * O * D) entries).
- random (DARE): drop each entry with probability p, rescale the kept ones by 1/(1-p),
  so the expected value is dW. The mask comes from a torch.Generator seeded per
  (seed, module, expert), so a merge can redraw the same mask in a second pass and an
  expert's mask does not depend on which other experts are merged.

The band is found with two `kthvalue` selections instead of a sort or a top-k (O(O D)
rather than O(O D log(O D)), and no index tensor). Entries tied at a threshold are all
kept at the low end and all dropped at the high end (random deltas have no ties).
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

Band = tuple[float, float]  # keep lo <= |x| < hi


def magnitude_band(delta: Tensor, density: float, gamma: float = 0.0) -> Band:
    """Thresholds (lo, hi) on |delta| that keep the entries ranked gamma..gamma+density.

    Counts follow PEFT and mergekit: k = int(density * n) kept, int(gamma * n) of the
    largest dropped (n = delta.numel()). Callers check 0 < density, 0 <= gamma and
    density + gamma <= 1. k = 0 gives a band that keeps nothing.
    """
    a = delta.detach().abs().flatten()  # (O * D,)
    n = a.numel()
    k, top = int(density * n), int(gamma * n)
    if k == 0:
        return float("inf"), float("inf")
    lo = float(torch.kthvalue(a, n - top - k + 1).values) if top + k < n else 0.0
    hi = float(torch.kthvalue(a, n - top + 1).values) if top > 0 else float("inf")
    return lo, hi


def keep_band(delta: Tensor, band: Band) -> Tensor:
    """`delta` with the entries outside the band zeroed, in place (returns `delta`)."""
    lo, hi = band
    if lo <= 0.0 and hi == float("inf"):
        return delta  # the band keeps everything (density 1)
    a = delta.abs()  # (O, D)
    return delta.masked_fill_((a < lo) | (a >= hi), 0.0)


def random_drop(delta: Tensor, drop: float, generator: torch.Generator) -> Tensor:
    """`delta` with each entry dropped with probability `drop` and the rest times 1/(1-drop).

    In place (returns `delta`); draws one uniform number per entry from `generator`
    (nothing when drop is 0).
    """
    if drop == 0.0:
        return delta
    u = torch.rand(delta.shape, generator=generator).to(delta.device)  # (O, D), drawn on CPU
    return delta.masked_fill_(u < drop, 0.0).mul_(1.0 / (1.0 - drop))


def generator_for(seed: int, module: str, expert: str) -> torch.Generator:
    """A CPU generator seeded from (seed, module, expert): the same triple, the same mask."""
    digest = hashlib.blake2b(f"{seed}\0{module}\0{expert}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
