"""What the fused layer asks of a mixer: the contract, as typing Protocols.

- `Mixer`: any callable `mixer(x) -> coefficients`, x the fused layer's input (B, T, D)
  (or (T, D)), coefficients (N,) (global), (B, N) (per sequence) or (B, T, N) (per
  token). A plain function qualifies; so does every module in lorafuse.mixers.
- `ProjectedMixer`: a mixer whose coefficients start with one linear map of x. It
  exposes the map as `projection` (P, D), P <= N, and the rest as `from_projection(p)`
  with `mixer(x) == mixer.from_projection(x @ projection.T)`. The fast path computes p
  inside the layer's own GEMM, so x is read once; gradients still reach `projection`.
  (ArrowRouter, LinearRouter.)
- `SoftmaxRouter`: a projected mixer that also says whether its coefficients are exactly
  softmax(q + b), q = |p| (`absolute`) or q = p: `softmax_bias` is b (N,) when they are,
  None when not (e.g. a top-k router). The fast path then trains the whole layer as one
  autograd Function. (LinearRouter.)

All three are runtime-checkable: `isinstance(m, ProjectedMixer)` checks that the
attributes are there (not their shapes; the fast path checks those before use).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Mixer(Protocol):
    """x (..., D) -> coefficients (N,), (B, N) or (B, T, N)."""

    def __call__(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class ProjectedMixer(Mixer, Protocol):
    """A mixer that is `from_projection(x @ projection.T)`, projection (P, D)."""

    @property
    def projection(self) -> Tensor: ...

    def from_projection(self, p: Tensor) -> Tensor:
        """Coefficients (..., N) from p = x @ projection.T (..., P)."""
        ...


@runtime_checkable
class SoftmaxRouter(ProjectedMixer, Protocol):
    """A projected mixer whose coefficients may be softmax(q + softmax_bias) exactly."""

    @property
    def softmax_bias(self) -> Tensor | None:
        """b (N,) when the coefficients are softmax(q + b), q = |p| or p; else None."""
        ...

    @property
    def absolute(self) -> bool:
        """Whether q = |p| (True) or q = p."""
        ...
