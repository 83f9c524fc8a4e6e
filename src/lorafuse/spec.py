"""Where a setup's pieces live: a benchmark folder, or a small YAML file.

A YAML spec for a real setup (paths relative to the file, or hub ids):

    base_model: microsoft/phi-2
    data: sordonia/flan-10k-flat
    experts:
      private: experts/private     # a folder of PEFT adapter folders
      mbc: experts/mbc
      shared: experts/shared
      hub: [owner/expert-a, owner/bundle/x@v1]   # hub ids (or a .txt file listing them)
    task_map:                      # optional; default: each expert's recorded tasks
      mbc: {task_a: cluster_0, task_b: cluster_1}
    dtype: bf16
    device: cuda
    max_length: 512
    batch_size: 16

Unknown keys are rejected with the key and its line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafuse.errors import LorafuseError
from lorafuse.formats.manifest import read_manifest
from lorafuse.formats.schema import read_text

MANIFEST = "manifest.json"


class LibrarySpec(BaseModel):
    """A base model, expert folders by kind, data, and evaluation settings."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    data: str
    experts: dict[str, str | list[str]] = Field(default_factory=dict)
    tokenizer: str | None = None
    task_map: dict[str, dict[str, str]] = Field(default_factory=dict)
    tasks: list[str] | None = None
    dtype: str = "fp32"
    device: str = "cpu"
    max_length: int = Field(256, gt=8)
    batch_size: int = Field(32, gt=0)
    fits: str = "fits"
    root: str = "."

    def expert_paths(self, kind: str) -> list[str]:
        """The entries of one expert kind (folders, hub ids, .txt lists), paths resolved."""
        entry = self.experts[kind]
        return [self.path(e) for e in ([entry] if isinstance(entry, str) else entry)]

    def path(self, value: str) -> str:
        """`value` resolved against the spec's folder when it names a local path."""
        p = Path(value)
        if p.is_absolute():
            return str(p)
        local = Path(self.root) / p
        return str(local) if local.exists() or value.startswith(".") else value


def load_spec(source: str | Path) -> LibrarySpec:
    """Read a benchmark folder (with manifest.json) or a YAML/JSON spec file.

    Raises LorafuseError naming the bad key (and its line for YAML) or the missing path.
    """
    src = Path(source)
    if src.is_dir():
        if not (src / MANIFEST).is_file():
            raise LorafuseError(
                f"{src} is a folder without {MANIFEST}; pass a folder made by "
                "`lorafuse benchmark build` or a YAML spec file"
            )
        return _from_benchmark(src)
    if not src.is_file():
        raise LorafuseError(f"library spec {src} does not exist")
    data, lines = parse_yaml(read_text(src, what="library spec"), src)
    if not isinstance(data, dict):
        raise LorafuseError(f"{src}: a library spec must be a mapping of keys to values")
    data.setdefault("root", str(src.parent))
    try:
        return LibrarySpec(**data)
    except ValidationError as e:
        raise LorafuseError(explain(e, src, lines)) from None


def _from_benchmark(root: Path) -> LibrarySpec:
    root = root.resolve()
    settings = read_manifest(root / MANIFEST).get("settings", {})
    experts_dir = root / "experts"
    kinds = {}
    if experts_dir.is_dir():
        kinds = {d.name: str(d) for d in sorted(experts_dir.iterdir()) if d.is_dir()}
    extra = {}
    if settings.get("expert", {}).get("max_length") is not None:
        extra["max_length"] = settings["expert"]["max_length"]
    if settings.get("eval_batch_size") is not None:
        extra["batch_size"] = settings["eval_batch_size"]
    return LibrarySpec(
        base_model=str(root / "base"),
        data=str(root / "data"),
        experts=kinds,
        root=str(root),
        **extra,
    )


def parse_yaml(text: str, src: Path) -> tuple[Any, dict[str, int]]:
    """YAML text -> (data, line of each key path like "methods.2.name"); LorafuseError if bad."""
    import yaml

    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise LorafuseError(f"{src}: not valid YAML ({e})") from None
    lines: dict[str, int] = {}

    def walk(n, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                key = f"{prefix}.{i}" if prefix else str(i)
                lines.setdefault(key, v.start_mark.line + 1)
                walk(v, key)

    if node is not None:
        walk(node, "")
    return data, lines


def explain(e: ValidationError, src: Path, lines: dict[str, int], model=LibrarySpec) -> str:
    """A user message for a pydantic error: each bad key with its YAML line."""
    parts = []
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        key = ".".join(loc)
        near = next((lines[k] for k in _prefixes(loc) if k in lines), None)
        where = f" (line {near})" if near is not None else ""
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(_fields_at(model, err["loc"][:-1])))
            parts.append(f"unknown key {key!r}{where}; known keys: {known}")
        elif err["type"] == "missing":
            parts.append(f"missing required key {key!r}")
        else:
            parts.append(f"key {key!r}{where}: {err['msg']}")
    return f"{src}: " + "; ".join(parts)


def _prefixes(loc: list[str]) -> list[str]:
    return [".".join(loc[:i]) for i in range(len(loc), 0, -1)]


def _fields_at(model, loc) -> list[str]:
    """The field names of the (nested) pydantic model at `loc` (for 'known keys')."""
    for part in loc:
        if isinstance(part, int) or not hasattr(model, "model_fields"):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            break
        inner = [a for a in _flat_args(field.annotation) if hasattr(a, "model_fields")]
        if inner:
            model = inner[0]
    return list(getattr(model, "model_fields", {}))


def _flat_args(tp) -> list:
    from typing import get_args

    out = [tp]
    for a in get_args(tp):
        out.extend(_flat_args(a))
    return out
