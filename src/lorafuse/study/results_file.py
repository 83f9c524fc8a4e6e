"""A finished study's results.json as `lorafuse compare` reads it back: the fields read.

The study writes the file (study/runner.py); compare, its labels and its headline read
claims, robust claims, methods, the config and the library's structure statistics. Each
field they read is typed here, so a hand-edited or truncated results.json gives the file
and the field. Losses may be NaN or null (a method that failed or diverged), as written.
"""

from __future__ import annotations

from typing import Any

from lorafuse.formats.schema import FileModel


class Comparison(FileModel):
    """One paired comparison behind a claim: A - B = diff +- se, and its verdict."""

    a: str
    b: str
    diff: float | None = None
    se: float | None = None
    verdict: str


class ClaimNumbers(FileModel):
    """A claim row's numbers: its comparisons, or a statistic's difference."""

    comparisons: list[Comparison] | None = None
    difference: dict[str, Any] | None = None


class ClaimRow(FileModel):
    """One claim of the study (claims.py)."""

    claim: str
    verdict: str
    paper: str = ""
    numbers: ClaimNumbers | None = None


class RobustClaim(FileModel):
    """One claim over several seeds (seeds.py `combine`)."""

    claim: str
    verdict: str
    verdicts: dict[str, str]


class MethodCost(FileModel):
    """A method's cost, as the headline ranks it."""

    relative_flops: float | None = None
    passes: float | None = None


class MethodRow(FileModel):
    """One evaluated method."""

    name: str
    family: str | None = None
    status: str | None = None
    experts: str | None = None
    mean: float | None = None
    se: float | None = None
    per_task: dict[str, float | None] | None = None
    cost: MethodCost | None = None


class ConfigRecord(FileModel):
    """The study's config, as labels read it."""

    name: str | None = None
    seed: int | None = None
    seeds: list[int] | None = None
    experts: str | None = None
    private_experts: str | None = None


class StructureRecord(FileModel):
    """The build's structure statistics (library.structure)."""

    not_best_share: float | None = None
    greedy_share: float | None = None
    off_task_ratio: float | None = None
    kinds: dict[str, dict[str, Any]] | None = None


class LibraryRecord(FileModel):
    """What the study recorded of its library."""

    preset: str | None = None
    structure: StructureRecord | None = None


class StudyResultsFile(FileModel):
    """results.json as compare reads it (the format is checked before, with its own fix)."""

    format: str
    claims: list[ClaimRow]
    robust_claims: list[RobustClaim] | None = None
    methods: list[MethodRow] | None = None
    config: ConfigRecord | None = None
    library: LibraryRecord | None = None
    seeds: dict[str, Any] | None = None
