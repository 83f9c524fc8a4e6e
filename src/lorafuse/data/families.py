"""The task families of the synthetic suite: inputs, operations and output formats.

A family draws inputs of one shape (a noun phrase, three digits, a date, ...) and offers
six or seven operations on them; a task is one (family, operation, format) with its own
instructions. Tasks of one family read the same inputs but want different answers, so
they conflict (only the instruction tells them apart). Families that share a skill are
close: lookup/sentiment (classify words), compare/arith (numbers), count/logic (count
over a sequence), dates/cipher (copy digits). Every answer comes from a closed
vocabulary or copies digits: skills a small model learns in minutes on a CPU.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOWELS = set("aeiou")


def _words(text: str) -> list[str]:
    return text.split()


MONTHS = _words(
    "January February March April May June July August September October November December"
)
CATEGORIES = {
    "animal": _words("cat dog horse tiger mouse eagle shark camel zebra otter"),
    "fruit": _words("apple pear plum lemon mango grape peach melon cherry kiwi"),
    "vegetable": _words("carrot onion potato leek pepper radish bean pea kale corn"),
    "tool": _words("hammer saw drill wrench chisel spade rake axe file pliers"),
    "vehicle": _words("car bus truck train boat bike tram van ship plane"),
    "furniture": _words("chair table sofa bed desk shelf stool bench lamp couch"),
    "instrument": _words("piano drum flute harp violin guitar oboe tuba cello horn"),
    "clothing": _words("shirt coat hat sock scarf glove dress skirt boot belt"),
}
NOUNS = [n for nouns in CATEGORIES.values() for n in nouns]
CATEGORY_OF = {n: c for c, nouns in CATEGORIES.items() for n in nouns}
COLORS = _words("red blue green black white brown pink grey gold tan")
SIZES = _words("big small long new tiny huge")
POSITIVE = _words("good great happy nice lovely fine bright kind")
NEGATIVE = _words("bad awful sad poor ugly rude dull cruel")


@dataclass(frozen=True)
class Op:
    """One operation of a family: its name, instruction phrasings and its function."""

    name: str
    phrases: tuple[str, ...]
    fn: Callable[[Any], str]
    options: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Format:
    """How a target is written: a phrase for the instruction and a wrapper."""

    name: str
    phrase: str
    wrap: Callable[[str], str]


@dataclass(frozen=True)
class Family:
    """Inputs of one shape and the operations on them."""

    name: str
    kind: str
    draw: Callable[[random.Random], tuple[str, Any]]
    ops: tuple[Op, ...]


FORMATS = (
    Format("plain", "", lambda s: s),
    Format("brackets", " in brackets", lambda s: f"[{s}]"),
    Format("quotes", " in quotes", lambda s: f"'{s}'"),
    Format("parens", " in parentheses", lambda s: f"({s})"),
    Format("period", " ending with a period", lambda s: f"{s}."),
    Format("arrow", " after an arrow", lambda s: f"=> {s}"),
)


def _number(rng: random.Random) -> tuple[str, str]:
    n = str(rng.randint(100, 999))
    return n, n


def _code_table(k: int) -> dict[str, str]:
    # A fixed digit -> letter table per key (independent of the build seed).
    letters = random.Random(f"cipher-table-{k}").sample(LETTERS, 10)
    return dict(zip("0123456789", letters))


def _encode(number: str, k: int) -> str:
    table = _code_table(k)
    return "".join(table[d] for d in number)


def _digits(rng: random.Random) -> tuple[str, tuple[int, ...]]:
    d = tuple(rng.randint(0, 9) for _ in range(3))
    return ", ".join(map(str, d)), d


def _phrase(rng: random.Random) -> tuple[str, tuple[str, str, str]]:
    size, color, noun = rng.choice(SIZES), rng.choice(COLORS), rng.choice(NOUNS)
    return f"a {size} {color} {noun}", (size, color, noun)


def _moods(rng: random.Random) -> tuple[str, int]:
    words = [rng.choice(rng.choice((POSITIVE, NEGATIVE))) for _ in range(3)]
    return " ".join(words), sum(1 if w in POSITIVE else -1 for w in words)


def _truths(rng: random.Random) -> tuple[str, list[bool]]:
    values = [rng.random() < 0.5 for _ in range(rng.randint(6, 9))]
    return " ".join("T" if v else "F" for v in values), values


def _letters(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice("abcd") for _ in range(rng.randint(5, 9)))
    return s, s


def _pair(rng: random.Random) -> tuple[str, tuple[int, int]]:
    a, b = rng.sample(range(10, 100), 2)
    return f"{a} and {b}", (a, b)


def _date(rng: random.Random) -> tuple[str, tuple[int, int, int]]:
    y, m, d = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return f"{y}-{m:02d}-{d:02d}", (y, m, d)


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def _most_common(s: str) -> str:
    return max(sorted(set(s)), key=s.count)


# fmt: off
SENTIMENT = Family("sentiment", "sentiment classification", _moods, (
    Op("posneg", ("Is the mood positive or negative", "Classify the sentiment"),
       lambda m: "positive" if m > 0 else "negative", ("positive", "negative")),
    Op("goodbad", ("Is it good or bad", "Rate the words"),
       lambda m: "good" if m > 0 else "bad", ("good", "bad")),
    Op("happy", ("Is the speaker happy", "Does it sound happy"), lambda m: _yes(m > 0),
       ("yes", "no")),
    Op("binary", ("Score the mood as 1 or 0", "Give a binary sentiment"),
       lambda m: "1" if m > 0 else "0", ("1", "0")),
    Op("stars", ("Give one or five stars", "Rate with stars"),
       lambda m: "*****" if m > 0 else "*", ("*****", "*")),
    Op("strength", ("How strong is the mood", "Give the mood strength"),
       lambda m: "strong" if abs(m) == 3 else "mild", ("strong", "mild")),
))
# fmt: on

# fmt: off
LOGIC = Family("logic", "boolean reasoning", _truths, (
    Op("any", ("Is any value true", "Is there a T"), lambda v: _yes(any(v)), ("yes", "no")),
    Op("all", ("Are all values true", "Is every value T"), lambda v: _yes(all(v)), ("yes", "no")),
    Op("majority", ("Give the majority value", "Which value wins the vote"),
       lambda v: "T" if sum(v) * 2 > len(v) else "F", ("T", "F")),
    Op("count", ("Count the true values", "How many are T"), lambda v: str(sum(v))),
    Op("first", ("Give the first value", "What is the first value"), lambda v: "TF"[not v[0]]),
    Op("last", ("Give the last value", "What is the last value"), lambda v: "TF"[not v[-1]]),
))
# fmt: on

# fmt: off
CIPHER = Family("cipher", "string encoding", _number, tuple(
    Op(f"code{k}", (f"Encode with the {name} key", f"Apply cipher {name}"),
       lambda n, k=k: _encode(n, k))
    for k, name in enumerate(("amber", "birch", "cedar", "delta", "ember", "frost"))
))
# fmt: on

# fmt: off
ARITH = Family("arith", "arithmetic", _digits, (
    Op("sum", ("Add the numbers", "Give the total"), lambda d: str(sum(d))),
    Op("max", ("Give the largest number", "Pick the biggest number"), lambda d: str(max(d))),
    Op("min", ("Give the smallest number", "Pick the least number"), lambda d: str(min(d))),
    Op("product", ("Multiply the first two", "Give the first pair's product"),
       lambda d: str(d[0] * d[1])),
    Op("range", ("Take largest minus smallest", "Give the spread"), lambda d: str(max(d) - min(d))),
    Op("median", ("Give the median", "Give the middle value"), lambda d: str(sorted(d)[1])),
    Op("lastdigit", ("Give the last digit of the sum", "Sum them modulo ten"),
       lambda d: str(sum(d) % 10)),
))
# fmt: on

# fmt: off
LOOKUP = Family("lookup", "classification", _phrase, (
    Op("category", ("Say what kind of thing it is", "Name the category"),
       lambda p: CATEGORY_OF[p[2]]),
    Op("color", ("Say what colour it is", "Name the colour"), lambda p: p[1]),
    Op("animal", ("Say if it is an animal", "Tell if it is a creature"),
       lambda p: _yes(CATEGORY_OF[p[2]] == "animal"), ("yes", "no")),
    Op("food", ("Say if you can eat it", "Tell if it is food"),
       lambda p: _yes(CATEGORY_OF[p[2]] in ("fruit", "vegetable")), ("yes", "no")),
    Op("big", ("Say if it is large", "Tell if it is big"), lambda p: _yes(p[0] in ("big", "huge")),
       ("yes", "no")),
    Op("size", ("Say how large it is", "Name the size"), lambda p: p[0]),
))
# fmt: on

# fmt: off
COUNT = Family("count", "counting", _letters, (
    Op("count_a", ("Count the letter a", "Say how many a there are"), lambda s: str(s.count("a"))),
    Op("count_b", ("Count the letter b", "Say how many b there are"), lambda s: str(s.count("b"))),
    Op("count_c", ("Count the letter c", "Say how many c there are"), lambda s: str(s.count("c"))),
    Op("length", ("Give the length", "Count all letters"), lambda s: str(len(s))),
    Op("distinct", ("Count the distinct letters", "Say how many letters differ"),
       lambda s: str(len(set(s)))),
    Op("common", ("Give the most frequent letter", "Name the commonest letter"), _most_common),
))
# fmt: on

# fmt: off
COMPARE = Family("compare", "comparison", _pair, (
    Op("which", ("Say which one is larger", "Tell which one wins"),
       lambda p: "first" if p[0] > p[1] else "second", ("first", "second")),
    Op("greater", ("Say if the first is larger", "Tell if the first one wins"),
       lambda p: _yes(p[0] > p[1]), ("yes", "no")),
    Op("parity", ("Say if the larger is even", "Give the larger one's parity"),
       lambda p: "even" if max(p) % 2 == 0 else "odd", ("even", "odd")),
    Op("tens", ("Compare the tens digits", "Say if the tens match"),
       lambda p: "same" if p[0] // 10 == p[1] // 10 else "different", ("same", "different")),
    Op("botheven", ("Are both numbers even", "Tell if both are even"),
       lambda p: _yes(p[0] % 2 == 0 and p[1] % 2 == 0), ("yes", "no")),
    Op("over100", ("Is the sum over 100", "Do they add up past 100"),
       lambda p: _yes(p[0] + p[1] > 100), ("yes", "no")),
))
# fmt: on

# fmt: off
DATES = Family("dates", "date reformatting", _date, (
    Op("year", ("Give the year", "Name the year"), lambda d: str(d[0])),
    Op("month", ("Give the month number", "Name the month as a number"), lambda d: str(d[1])),
    Op("day", ("Give the day", "Name the day of the month"), lambda d: str(d[2])),
    Op("dmy", ("Write it as day/month/year", "Give the European form"),
       lambda d: f"{d[2]:02d}/{d[1]:02d}/{d[0]}"),
    Op("mdy", ("Write it as month/day/year", "Give the American form"),
       lambda d: f"{d[1]:02d}/{d[2]:02d}/{d[0]}"),
    Op("monthname", ("Name the month", "Spell out the month"), lambda d: MONTHS[d[1] - 1]),
    Op("short", ("Write day and short month", "Give the short form"),
       lambda d: f"{d[2]} {MONTHS[d[1] - 1][:3]}"),
))
# fmt: on

FAMILIES: tuple[Family, ...] = (LOOKUP, SENTIMENT, COMPARE, DATES, LOGIC, CIPHER, COUNT, ARITH)
