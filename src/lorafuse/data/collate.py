"""Collation as in mttl: source + " " + target + EOS, loss on the target only.

The separating space is moved to the target (mttl's `add_space_and_eos`), so the labels
are -100 on exactly the source tokens and the padding. Sources longer than the budget
are truncated from the left, keeping the end of the prompt next to the answer; padding
is on the right.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

IGNORE = -100
Encoded = tuple[list[int], list[int]]  # (source ids, target ids incl. the space and EOS)


def encode(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[Encoded]:
    """Token ids of each (source, target): (ids of source, ids of " " + target + EOS)."""
    sources = tokenizer([s for s, _ in pairs], add_special_tokens=False)["input_ids"]
    targets = tokenizer([" " + t for _, t in pairs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(s, [*t, eos]) for s, t in zip(sources, targets)]


def truncate(source: list[int], target: list[int], max_length: int) -> Encoded:
    """Fit source + target into `max_length` tokens, cutting the source from the left
    (and the target from the right only when it alone is too long)."""
    target = target[:max_length]
    keep = max_length - len(target)
    return (source[max(0, len(source) - keep) :] if keep > 0 else []), target


def collate(encoded: Sequence[Encoded], pad_id: int, max_length: int = 256) -> dict[str, Tensor]:
    """Pad a batch of encoded examples to its longest sequence (at most `max_length`).

    Returns input_ids (B, T), attention_mask (B, T) and labels (B, T) with IGNORE on the
    source and the padding; labels are aligned with input_ids (the model shifts them).
    """
    rows = [truncate(s, t, max_length) for s, t in encoded]
    T = max(len(s) + len(t) for s, t in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for i, (s, t) in enumerate(rows):
        n = len(s) + len(t)
        input_ids[i, :n] = torch.tensor(s + t)
        labels[i, len(s) : n] = torch.tensor(t)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Collator:
    """Callable collator for (source, target) pairs: `encode` then `collate`."""

    def __init__(self, tokenizer, max_length: int = 256):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> dict[str, Tensor]:
        """A padded batch (see `collate`) for (source, target) pairs."""
        return collate(encode(self.tokenizer, pairs), self.tokenizer.pad_token_id, self.max_length)
