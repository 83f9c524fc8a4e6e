"""Row-sparse per-sequence coefficients: gather each row's experts instead of all N.

One-hot rows of the matrix, ensembles and the oracle use a few experts per sequence.
With (B, N) coefficients of at most N/2 nonzeros per row, mixing each row's K experts'
factors costs less than the two GEMMs over all N*R columns.
"""

from __future__ import annotations

import torch
from torch import Tensor


def applies(c: Tensor, x: Tensor, num_experts: int) -> bool:
    """Whether c is (B, N) for x (B, T, D) with at most N/2 experts used in every row."""
    if c.dim() != 2 or x.dim() != 3 or c.shape != (x.shape[0], num_experts):
        return False
    return 2 * int((c != 0).sum(-1).max()) <= num_experts


def delta(layer, x: Tensor, c: Tensor) -> Tensor:
    """The mixed experts' contribution (B, T, O) for x (B, T, D), c (B, N) in x's dtype."""
    N, R, O = layer.num_experts, layer.rank, layer.out_features
    K = max(1, int((c != 0).sum(-1).max()))
    idx = c.abs().topk(K, dim=-1).indices  # (B, K)
    w = c.gather(-1, idx)  # (B, K)
    A = layer.A_rows.reshape(R, N, -1).transpose(0, 1)[idx]  # (B, K, R, D)
    B = layer.B_cat.view(R, N, O).transpose(0, 1)[idx]  # (B, K, R, O), scalings included
    if layer.space == "factors":
        A_mix = torch.einsum("bkrd,bk->bdr", A, w)  # (B, D, R)
        B_mix = torch.einsum("bkro,bk->bro", B, w)  # (B, R, O)
        return torch.bmm(torch.bmm(x, A_mix), B_mix)  # (B, T, O)
    u = torch.einsum("btd,bkrd->btkr", x, A)  # (B, T, K, R)
    return torch.einsum("btkr,bkro->bto", u * w[:, None, :, None], B)  # (B, T, O)
