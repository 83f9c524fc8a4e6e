"""Greedy decoding with a KV cache, for every method: one loop, two decoders.

A Decoder gives the next-token log-probabilities of a batch of left-padded prompts, then
of each token appended:

    start(input_ids (B, T), attention_mask (B, T)) -> (B, V)
    step(tokens (B,)) -> (B, V)

- ModelDecoder: the model as it is set up (base, merged, routed, fused with fixed or
  per-row coefficients): one forward per step over its KV cache. Position ids follow
  the attention mask, so a left-padded row decodes as it would alone.
- EnsembleDecoder: an output-level ensemble. Each prompt is repeated once per expert
  with a nonzero weight and each copy gets that expert's one-hot coefficients through
  the fused layer, so every expert keeps its own KV-cache rows and all of them run in
  one forward per step; their next-token distributions are mixed as the ensemble scores
  them (lorafuse.ensemble: probabilities or logits). A sparse ensemble runs only its
  nonzero experts.

`greedy` runs the loop on one batch; `generate_ids` over many prompts, in batches.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from lorafuse.ensemble import LEVELS, coefficient_rows, finish, mix_part
from lorafuse.errors import LorafuseError
from lorafuse.parallel import map_sharded


class Decoder(Protocol):
    """Next-token log-probabilities of a batch of prompts, then of each appended token."""

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...

    def step(self, tokens: Tensor) -> Tensor: ...


class ModelDecoder:
    """The model as it is set up, one forward per step over its KV cache."""

    def __init__(self, model):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # transformers 5 calls the KV cache `cache`; earlier versions `past_key_values`.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.cache = None
        self.mask: Tensor | None = None  # (B, T so far)

    def start_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits (B, V) of the token after each prompt; fills the KV cache."""
        self.cache = None
        self.mask = attention_mask
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # (B, T)
        return self._forward(input_ids, positions)

    def step_logits(self, tokens: Tensor) -> Tensor:
        """Logits (B, V) of the token after `tokens` (B,), appended to every row."""
        if self.mask is None:
            raise LorafuseError("a decoder steps only after start()")
        ones = torch.ones_like(self.mask[:, :1])  # (B, 1)
        self.mask = torch.cat([self.mask, ones], 1)  # (B, T + 1)
        positions = self.mask.sum(-1, keepdim=True) - 1  # (B, 1)
        return self._forward(tokens[:, None], positions)

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Next-token log-probabilities (B, V) after each prompt."""
        return torch.log_softmax(self.start_logits(input_ids, attention_mask), -1)

    def step(self, tokens: Tensor) -> Tensor:
        """Next-token log-probabilities (B, V) after appending `tokens` (B,)."""
        return torch.log_softmax(self.step_logits(tokens), -1)

    def _forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: self.cache},
            **self._keep,
        )
        self.cache = out.get(self._cache_arg)
        return out.logits[:, -1].float()  # (B, V)


class EnsembleDecoder:
    """An output-level ensemble of the fusion's experts: every nonzero expert in one
    forward per step (the batch repeated per expert, one-hot coefficients per row)."""

    def __init__(self, model, fusion, weights: Tensor, level: str = "probs"):
        if level not in LEVELS:
            raise LorafuseError(f"unknown ensemble level {level!r}; choose one of {LEVELS}")
        N = fusion.num_experts
        w = torch.as_tensor(weights, dtype=torch.float32).detach().cpu()  # (N,)
        if w.shape != (N,):
            raise LorafuseError(f"ensemble weights must be ({N},); got {tuple(w.shape)}")
        self.experts = torch.nonzero(w).flatten()  # (n,) the experts that run
        if len(self.experts) == 0:
            raise LorafuseError("every ensemble weight is zero; at least one expert must be used")
        self.fusion, self.level = fusion, level
        self.weights = w[self.experts]  # (n,)
        self.inner = ModelDecoder(model)

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The ensemble's next-token log-probabilities (B, V) after each prompt."""
        n, B = len(self.experts), input_ids.shape[0]
        one_hot = torch.eye(self.fusion.num_experts)[self.experts]  # (n, N)
        self.fusion.set_coefficients(coefficient_rows(one_hot, B))  # (n*B, N)
        logits = self.inner.start_logits(input_ids.repeat(n, 1), attention_mask.repeat(n, 1))
        return self._mix(logits, B)  # logits (n*B, V)

    def step(self, tokens: Tensor) -> Tensor:
        """The ensemble's next-token log-probabilities (B, V) after appending `tokens` (B,)."""
        logits = self.inner.step_logits(tokens.repeat(len(self.experts)))  # (n*B, V)
        return self._mix(logits, tokens.shape[0])

    def _mix(self, logits: Tensor, B: int) -> Tensor:
        per_expert = logits.view(len(self.experts), B, -1)  # (n, B, V)
        return finish(mix_part(per_expert, self.weights, self.level), self.level)  # (B, V)


@torch.inference_mode()
def greedy(decoder: Decoder, input_ids: Tensor, attention_mask: Tensor, caps: Tensor,
           eos_id: int) -> list[list[int]]:  # fmt: skip
    """Greedy continuations of left-padded prompts: input_ids, attention_mask (B, T), caps
    (B,) the most new tokens of each row. A row stops at `eos_id` (not returned) or at its
    cap; the loop stops when every row has."""
    B = input_ids.shape[0]
    S = int(caps.max()) if B else 0
    out = torch.full((B, max(S, 1)), eos_id, dtype=torch.long)  # (B, S)
    alive = caps > 0  # (B,)
    if S == 0:
        return [[] for _ in range(B)]
    logp = decoder.start(input_ids, attention_mask)  # (B, V)
    for t in range(S):
        nxt = logp.argmax(-1).cpu()  # (B,)
        out[:, t] = torch.where(alive, nxt, eos_id)
        alive &= (nxt != eos_id) & (caps > t + 1)
        if not alive.any():
            break
        logp = decoder.step(nxt.to(input_ids.device))
    rows = []
    for row, cap in zip(out.tolist(), caps.tolist()):
        row = row[:cap]
        rows.append(row[: row.index(eos_id)] if eos_id in row else row)
    return rows


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """input_ids and attention_mask (B, T) of token lists, padded on the left."""
    T = max((len(p) for p in prompts), default=0)
    ids = torch.full((len(prompts), max(T, 1)), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros_like(ids)  # (B, T)
    for i, p in enumerate(prompts):
        if p:
            ids[i, T - len(p) :] = torch.tensor(list(p))
            mask[i, T - len(p) :] = 1
    return ids, mask


def generate_ids(
    decoder: Callable[[list[str]], Decoder],
    prompts: Sequence[Sequence[int]],
    caps: Sequence[int],
    eos_id: int,
    pad_id: int,
    tasks: Sequence[str] | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations of every prompt (token ids, at most its cap of new tokens),
    in the prompts' order. Prompts run in batches of similar length; `decoder(tasks)`
    makes a fresh Decoder for each batch (given its rows' tasks: an oracle sets its
    experts from them). Under `accelerate launch` each process decodes its share of the
    batches and every process gets all continuations. Raises LorafuseError for an empty
    prompt or mismatched lengths."""
    if len(caps) != len(prompts) or (tasks is not None and len(tasks) != len(prompts)):
        raise LorafuseError(f"{len(prompts)} prompts need as many caps and tasks")
    if any(len(p) == 0 for p in prompts):
        raise LorafuseError("a prompt has no token; every prompt must be non-empty")
    names = list(tasks) if tasks is not None else [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = max(1, batch_size)

    def one(start: int) -> list[list[int]]:
        idx = order[start : start + size]
        ids, mask = left_pad([prompts[i] for i in idx], pad_id)
        rows = greedy(
            decoder([names[i] for i in idx]), ids.to(device), mask.to(device),
            torch.tensor([caps[i] for i in idx]), eos_id,
        )  # fmt: skip
        if progress is not None:
            progress(len(idx))
        return rows

    out: list[list[int]] = [[] for _ in prompts]
    starts = range(0, len(order), size)
    for start, rows in zip(starts, map_sharded(one, starts)):
        for i, row in zip(order[start : start + size], rows):
            out[i] = row
    return out
