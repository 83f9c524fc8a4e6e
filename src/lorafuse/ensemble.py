"""Output-level ensembles: mix the experts' next-token distributions (or logits).

probabilities: log p(x) = logsumexp_i (log l_i + log p_i(x))   (the paper)
logits:        log p(x) = log_softmax(sum_i l_i z_i(x))          (B.3's comparison)

The experts with nonzero weight run as one batched forward per chunk of experts (each
batch row repeated per expert, one-hot coefficients per row through the fused layer);
the chunk size bounds memory at about rows_per_pass x T x V logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorafuse.errors import LorafuseError

LEVELS = ("probs", "logits")


def chunks(indices: list[int], rows: int, rows_per_pass: int) -> list[list[int]]:
    """`indices` (experts, grid points) grouped so that `rows` batch rows for each index of
    a group make at most rows_per_pass rows per forward (at least one index per group)."""
    n = max(1, rows_per_pass // max(1, rows))
    return [indices[i : i + n] for i in range(0, len(indices), n)]


def coefficient_rows(coefficients: Tensor, rows: int) -> Tensor:
    """Per-row coefficients (n*rows, N) for a batch of `rows` rows repeated n times
    (`tensor.repeat(n, 1)`): row j*rows + b gets coefficients[j] (n, N)."""
    return coefficients.repeat_interleave(rows, 0)  # (n*rows, N)


def expert_chunks(weights: Tensor, rows: int, rows_per_pass: int) -> list[list[int]]:
    """The experts with nonzero weight, grouped so that each forward has <= rows_per_pass rows."""
    return chunks(torch.nonzero(weights).flatten().tolist(), rows, rows_per_pass)


def ensemble_logprobs(
    model,
    fusion,
    tensors: dict[str, Tensor],
    weights: Tensor,
    level: str = "probs",
    rows_per_pass: int = 256,
) -> Tensor:
    """The ensemble's next-token log-probabilities (B, T, V) for one collated batch.

    `fusion` is the model's Fusion over the N experts; `weights` (N,) are the ensemble
    coefficients (on the simplex; gradients flow into them, not into the experts).
    Raises LorafuseError for an unknown level or weights of the wrong size.
    """
    if level not in LEVELS:
        raise LorafuseError(f"unknown ensemble level {level!r}; choose one of {LEVELS}")
    N = fusion.num_experts
    if weights.shape != (N,):
        raise LorafuseError(f"ensemble weights must be ({N},); got {tuple(weights.shape)}")
    ids, mask = tensors["input_ids"], tensors["attention_mask"]
    B = ids.shape[0]
    eye = torch.eye(N)
    out = None
    for chunk in expert_chunks(weights.detach(), B, rows_per_pass):
        n = len(chunk)
        fusion.set_coefficients(coefficient_rows(eye[chunk], B))  # (n*B, N)
        with torch.no_grad():
            logits = model(input_ids=ids.repeat(n, 1), attention_mask=mask.repeat(n, 1)).logits
        logits = logits.view(n, B, *logits.shape[1:])  # (n, B, T, V)
        part = mix_part(logits, weights[chunk], level)  # (B, T, V)
        out = part if out is None else add_parts(out, part, level)
    if out is None:
        raise LorafuseError("every ensemble weight is zero; at least one expert must be used")
    return finish(out, level)


def mix_part(logits: Tensor, weights: Tensor, level: str) -> Tensor:
    """One group of experts' share of the mixture: logits (n, ..., V), weights (n,) ->
    (..., V): log sum_i w_i p_i at level probs, sum_i w_i z_i at level logits (fp32)."""
    w = weights.to(logits.device, torch.float32)  # (n,)
    w = w.view(-1, *([1] * (logits.dim() - 1)))  # (n, 1, ..., 1)
    if level == "probs":
        return torch.logsumexp(torch.log_softmax(logits.float(), -1) + w.log(), 0)
    return (w * logits.float()).sum(0)


def add_parts(a: Tensor, b: Tensor, level: str) -> Tensor:
    """Two groups' shares added (log-sum-exp of log-probabilities, or a sum of logits)."""
    return torch.logaddexp(a, b) if level == "probs" else a + b


def finish(total: Tensor, level: str) -> Tensor:
    """The mixture's next-token log-probabilities (..., V) from every group's shares."""
    return total if level == "probs" else torch.log_softmax(total, -1)
