"""Scores of a generated answer against its reference: exact match and Rouge-L.

exact match: 1 when normalise(answer) == normalise(reference), else 0. normalise
lowercases (Unicode NFKC first), collapses runs of whitespace to one space and trims
the ends. Punctuation is kept: in the built-in tasks the format (brackets, quotes, an
arrow, a final period) is part of the answer.

Rouge-L (Lin, 2004), as rouge_score computes it without stemming: both texts are
lowercased and split into tokens of [a-z0-9] (every other character separates); with
L = the length of their longest common subsequence, P = L / len(answer tokens) and
R = L / len(reference tokens), Rouge-L = 2 P R / (P + R), and 0 when either text has
no token or L = 0.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

_SPACE = re.compile(r"\s+")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def normalise(text: str) -> str:
    """`text` lowercased (NFKC), whitespace runs collapsed to one space, ends trimmed."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def exact_match(answer: str, reference: str) -> float:
    """1.0 when the normalised texts are equal, else 0.0."""
    return float(normalise(answer) == normalise(reference))


def rouge_tokens(text: str) -> list[str]:
    """Rouge's tokens: the lowercased text split on every run of characters not in [a-z0-9]."""
    return [t for t in _NON_ALNUM.split(text.lower()) if t]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len a x len b))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(answer: str, reference: str) -> float:
    """Rouge-L F-measure (beta = 1) of `answer` against `reference`, in [0, 1]."""
    a, r = rouge_tokens(answer), rouge_tokens(reference)
    common = lcs_length(a, r)
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


METRICS = {"exact_match": exact_match, "rouge_l": rouge_l}
