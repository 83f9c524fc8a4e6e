"""Exact match and Rouge-L against hand computations (and rouge_score where installed)."""

from __future__ import annotations

import random

import pytest

from lorafuse.metrics import exact_match, lcs_length, normalise, rouge_l, rouge_tokens


def test_normalise_lowercases_and_collapses_whitespace_but_keeps_punctuation():
    assert normalise("  [Six]\n ") == "[six]"
    assert normalise("=>\t IOV") == "=> iov"
    assert exact_match(" 'First' ", "'first'") == 1.0
    assert exact_match("first", "'first'") == 0.0  # the format is part of the answer
    assert exact_match("yes", "yes.") == 0.0
    assert exact_match("\uff21", "a") == 1.0  # NFKC: a full-width A is an A


def test_rouge_l_by_hand():
    # tokens: [the, cat, sat, on, the, mat] vs [the, cat, on, mat]: LCS 4, P 4/6, R 4/4
    assert rouge_l("The cat sat on the mat.", "the cat, on mat") == pytest.approx(0.8)
    assert rouge_tokens("=> iov") == ["iov"]
    assert rouge_l("[12]", "[12]") == 1.0
    assert rouge_l("[1]", "[12]") == 0.0
    assert rouge_l("", "x") == 0.0 and rouge_l("...", "...") == 0.0  # no token: 0
    # LCS [b, c, d] of [a, b, c, d] and [b, x, c, d]: P = R = 3/4
    assert rouge_l("a b c d", "b x c d") == pytest.approx(0.75)


def test_lcs_against_brute_force():
    from itertools import combinations

    rng = random.Random(0)
    for _ in range(50):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 6))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 6))]
        subs = {c for k in range(len(a) + 1) for c in combinations(a, k)}
        best = max(
            (len(s) for s in subs if _is_subsequence(s, b)),
            default=0,
        )
        assert lcs_length(a, b) == best


def _is_subsequence(s, b) -> bool:
    it = iter(b)
    return all(x in it for x in s)


def test_rouge_l_equals_rouge_score():
    scorer_mod = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = scorer_mod.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(1)
    words = ["red", "cat", "12", "the", "a", "=>", "[9]", "Dog", "x-y", "'no'"]
    for _ in range(200):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(0, 7)))
        r = " ".join(rng.choice(words) for _ in range(rng.randint(0, 7)))
        expected = scorer.score(r, a)["rougeL"].fmeasure
        assert rouge_l(a, r) == pytest.approx(expected, abs=1e-12), (a, r)
