"""Stage cache of a study: each stage's result is a JSON file keyed by its inputs.

A stage's key is a hash of everything its result depends on (the library's identity,
the method, its options, example caps, seed, device, dtype). A re-run finds a stage
whose stored key equals the new key and skips it; any changed input changes the key
and the stage runs again. Files are written atomically, so an interrupted study keeps
every finished stage and resumes at the first unfinished one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from lorafuse.errors import LorafuseError
from lorafuse.formats.schema import FileModel, Finite, parse_json
from lorafuse.io import write_json
from lorafuse.parallel import once

# Part of every fit's stage key: raised when lorafuse changes how a fit trains for the
# same options (2: a run trained until a plateau keeps its rate constant), so that a
# study made by an older lorafuse refits instead of reusing fits trained the old way.
FIT_RULES = 2


def stage_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StageFile(FileModel):
    """One stored stage: the key it was made with, its time and its (JSON) value."""

    key: str
    seconds: Annotated[Finite, Field(ge=0)] = 0.0
    value: Any


class StageCache:
    """Results of finished stages under `root/<stage>.json` ({"key", "seconds", "value"})."""

    def __init__(self, root: str | Path, fallback: StageCache | None = None):
        self.root = Path(root)
        self.timings: dict[str, dict[str, Any]] = {}
        # asked for a stage this cache lacks: an equal key means equal inputs (another
        # seed's cache serves what does not depend on the seed)
        self.fallback = fallback

    def file(self, stage: str) -> Path:
        """Where stage `stage` is stored (':' and '/' made file-safe)."""
        return self.root / (stage.replace(":", "_").replace("/", "_") + ".json")

    def get(self, stage: str, key: str) -> dict | None:
        """The stored value of `stage` when it was made with `key` (here, else in the
        fallback cache), else None. Under `accelerate launch` the main process reads it
        and sends it to the others, so that all take the same path."""
        stored = once(lambda: self._lookup(stage, key))
        if stored is None:
            return None
        self.timings.setdefault(stage, {"seconds": stored.get("seconds", 0.0), "cached": True})
        return stored["value"]

    def _lookup(self, stage: str, key: str) -> dict | None:
        stored = self._stored(stage, key)
        if stored is None and self.fallback is not None:
            stored = self.fallback._stored(stage, key)
        return stored

    def _stored(self, stage: str, key: str) -> dict | None:
        f = self.file(stage)
        if not f.is_file():
            return None
        try:  # a torn or hand-edited entry is a miss: the stage runs again and rewrites it
            stored = parse_json(f, StageFile)
        except LorafuseError:
            return None
        return stored.model_dump() if stored.key == key else None

    def put(self, stage: str, key: str, value: Any, seconds: float) -> None:
        """Store `value` for `stage` under `key` (the main process writes)."""
        entry = {"key": key, "seconds": round(seconds, 3), "value": value}
        once(lambda: write_json(self.file(stage), entry))  # an error stops every process
        self.timings[stage] = {"seconds": round(seconds, 3), "cached": False}

    def run(self, stage: str, key: str, compute: Callable[[], Any]) -> Any:
        """The cached value of `stage` for `key`, else `compute()` stored under `key`."""
        value = self.get(stage, key)
        if value is not None:
            return value
        start = time.perf_counter()
        value = compute()
        self.put(stage, key, value, time.perf_counter() - start)
        return value


def setup_key(ws) -> str:
    """Identity of the setup: the spec and each expert file's size and mtime."""
    files = []
    for kind in sorted(ws.spec.experts):
        for entry in ws.spec.expert_paths(kind):
            if not Path(entry).exists():  # a hub id: its name (and revision) identifies it
                files.append([kind, entry])
            elif Path(entry).is_file():  # a .txt list of ids
                files.append([kind, entry, Path(entry).read_text(errors="replace")])
            for f in sorted(Path(entry).rglob("adapter_model.*")):
                st = f.stat()
                files.append([kind, str(f), st.st_size, st.st_mtime_ns])
    spec = ws.spec.model_dump(exclude={"fits"})
    return stage_key(spec, files, ws.base_id, str(ws.device), str(ws.dtype))


class Progress:
    """Progress callbacks of a study (the CLI draws bars; the default does nothing)."""

    def plan(self, stages: list[str]) -> None:
        """The stages about to run, in order."""

    def start(self, stage: str, total: int | None) -> None:
        """A stage begins; `total` units of work (None: unknown)."""

    def advance(self, n: int = 1) -> None:
        """`n` units of the current stage are done."""

    def update(self, done: int, total: int) -> None:
        """The current stage is at `done` of `total`."""

    def finish(self, stage: str, cached: bool) -> None:
        """A stage ended (`cached`: its stored result was reused)."""
