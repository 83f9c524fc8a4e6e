"""A benchmark build's manifest.json as lorafuse reads it back: the fields read, typed.

`lorafuse benchmark build` writes the manifest (benchmark/build.py); the library spec,
the study and a resumed build read it. Every field they read is checked here once, so a
hand-edited or truncated manifest gives the file and the field, not a KeyError later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from lorafuse.formats.schema import Count, FileModel, Finite, PositiveInt, check, read_json

Share = Annotated[Finite, Field(ge=0, lt=1)]


class ExpertRecord(FileModel):
    """settings.expert: what the study and the spec read of the experts' training."""

    max_length: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    steps: Count | None = None
    replay: Share | None = None


class SettingsRecord(FileModel):
    """settings: the build's settings (BuildSettings.to_dict); the fields read back."""

    expert: ExpertRecord = Field(default_factory=ExpertRecord)
    eval_batch_size: PositiveInt | None = None
    shared_steps: Count | None = None
    cluster_steps_per_task: bool | None = None


class FamilyRecord(FileModel):
    """One task family: its name and tasks."""

    name: str
    tasks: list[str]


class ManifestExpert(FileModel):
    """One expert of the build: its kind and tasks."""

    name: str | None = None
    kind: str
    tasks: list[str]


class StageRecord(FileModel):
    """One finished stage: its time and what it reported (kept as written)."""

    seconds: Finite | None = None
    kinds: dict[str, dict[str, Any]] | None = None


class ManifestFile(FileModel):
    """manifest.json as lorafuse reads it back."""

    format: str | None = None
    preset: str | None = None
    seed: int | None = None
    settings: SettingsRecord = Field(default_factory=SettingsRecord)
    families: list[FamilyRecord] = Field(default_factory=list)
    experts: list[ManifestExpert] = Field(default_factory=list)
    stages: dict[str, StageRecord] = Field(default_factory=dict)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest at `path`, checked by ManifestFile, as written (a dict).

    Raises FileFormatError naming the file and the field when it is missing, not valid
    JSON, or a field it records has the wrong type or value.
    """
    raw = read_json(path, what="build manifest")
    check(raw, ManifestFile, path, what="build manifest")
    return raw
