"""StackedModule: every expert's LoRA factors for one target module, and the one fold.

Expert i adapts a module by s_i B_i A_i with A_i (R, D), B_i (O, R) and scaling s_i
(alpha / r, or alpha / sqrt(r) with rsLoRA); experts of lower rank are zero-padded to the
module's largest rank R (exact: padded rows and columns contribute nothing). Folding
coefficients l (N,) into the factors is the one formula every consumer uses (the fused
layer, merging, hierarchical routing):
- `factors` (the paper, mttl): A* = sum_i l_i A_i (R, D), B* = sum_i l_i s_i B_i (O, R)
- `deltas`  (full rank, PEFT):  sum_i l_i s_i B_i A_i, kept exact as factors of rank
  sum_i r_i (the experts' factors side by side).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lorafuse.errors import LorafuseError

SPACES = ("factors", "deltas")


def check_space(space: str) -> str:
    """Return `space` if it is a known mixing space, else raise LorafuseError."""
    if space not in SPACES:
        raise LorafuseError(f"unknown mixing space {space!r}; choose one of {', '.join(SPACES)}")
    return space


@dataclass
class StackedModule:
    """All experts' factors for one target module (zero-padded to rank R)."""

    A: Tensor  # (N, R, D)
    B: Tensor  # (N, O, R)
    scale: Tensor  # (N,)
    rank: Tensor  # (N,) int64, each expert's true rank
    fan_in_fan_out: bool = False

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, R, D, O)."""
        N, R, D = self.A.shape
        return N, R, D, self.B.shape[1]

    def to(self, device=None, dtype=None) -> StackedModule:
        """A copy with A and B moved/cast (scale stays fp32, rank stays int64)."""
        return replace(
            self,
            A=self.A.to(device=device, dtype=dtype),
            B=self.B.to(device=device, dtype=dtype),
            scale=self.scale.to(device=device),
            rank=self.rank.to(device=device),
        )

    def select(self, index: Tensor) -> StackedModule:
        """The experts at `index` (a 1-D long tensor), in that order."""
        return replace(
            self, A=self.A[index], B=self.B[index], scale=self.scale[index], rank=self.rank[index]
        )

    def scaled_B(self) -> Tensor:
        """s_i B_i for every expert (N, O, R), in B's dtype: the scalings folded in."""
        return self.B * self.scale.to(self.B)[:, None, None]  # (N, O, R)

    def fold(self, coefficients: Tensor, space: str = "factors") -> tuple[Tensor, Tensor]:
        """Fold coefficients l (N,) into one pair of factors (A (M, D), B (O, M)), fp32.

        `factors`: M = R, A = sum l_i A_i, B = sum l_i s_i B_i. `deltas`: B A equals
        sum l_i s_i B_i A_i exactly, M = the summed ranks of the experts with l_i != 0
        (a zero pair of rank 1 when there is none). Raises LorafuseError for another space.
        """
        l = coefficients.to(device=self.A.device, dtype=torch.float32)  # (N,)
        if check_space(space) == "factors":
            A, B = self.fold_factors(l)
            return A, B
        keep = [(i, r) for i, r in enumerate(self.rank.tolist()) if float(l[i]) != 0 and r > 0]
        if not keep:
            _, _, D, O = self.shape
            return torch.zeros(1, D), torch.zeros(O, 1)
        A = torch.cat([(l[i] * self.scale[i]) * self.A[i, :r].float() for i, r in keep])  # (M, D)
        B = torch.cat([self.B[i, :, :r].float() for i, r in keep], dim=1)  # (O, M)
        return A, B

    def fold_factors(self, coefficients: Tensor) -> tuple[Tensor, Tensor]:
        """The factors-space fold for one or C coefficient vectors, fp32:
        l (N,) -> A* (R, D), B* (O, R); l (C, N) -> A* (C, R, D), B* (C, O, R)."""
        l = coefficients.to(device=self.A.device, dtype=torch.float32)  # (N,) or (C, N)
        A = torch.einsum("...n,nrd->...rd", l, self.A.float())  # (..., R, D)
        sl = l * self.scale.to(l)  # (..., N): l_i s_i
        B = torch.einsum("...n,nor->...or", sl, self.B.float())  # (..., O, R)
        return A, B
