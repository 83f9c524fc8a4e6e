"""A routed model on disk: the expert library reference, router weights and settings.

Folder layout (written atomically):
    routed.json          format, space, router kind, top-k, temperature, the experts
                         (name and folder, in library order), the modules, free settings
    routers.safetensors  `<module path>.<tensor>` for every fused layer's router

This module holds the schema and plain reading and writing only; building the routers
and attaching them to a model (`save_routed`, `load_routed`) is `lorafuse.routed`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from torch import Tensor

from lorafuse.errors import LorafuseError
from lorafuse.formats.schema import FileModel, Finite, PositiveInt, check, read_json
from lorafuse.io import atomic_dir

CONFIG_NAME = "routed.json"
ROUTERS_NAME = "routers.safetensors"
FORMAT = "lorafuse-routed"
VERSION = 1


class RoutedExpert(FileModel):
    """One expert of a routed model: its name and folder."""

    name: str
    path: str


class RoutedFile(FileModel):
    """routed.json as `read_routed` reads it (see `lorafuse.routed.save_routed`)."""

    format: Literal[FORMAT]
    version: Literal[VERSION]
    space: Literal["factors", "deltas"]
    router: Literal["arrow", "linear"]
    top_k: PositiveInt | None = None
    temperature: Annotated[Finite, Field(gt=0)] | None = None
    absolute: bool | None = None
    experts: list[RoutedExpert]
    base_model: str | None = None
    modules: list[str]
    settings: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _arrow_has_temperature(self) -> RoutedFile:
        if self.router == "arrow" and self.temperature is None:
            raise ValueError("field 'temperature': arrow routers need one (a number > 0)")
        return self


def write_routed(
    out: str | Path, config: dict[str, Any], tensors: dict[str, Tensor], force: bool = False
) -> Path:
    """Write routed.json (`config`, JSON-ready, with format and version added) and the
    router `tensors` (`<module path>.<tensor>` -> tensor) to the folder `out`, atomically.

    Raises OutputExistsError when `out` exists and not `force`.
    """
    from safetensors.torch import save_file

    config = {"format": FORMAT, "version": VERSION, **config}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    with atomic_dir(out, force) as tmp:
        save_file(tensors, str(tmp / ROUTERS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out)


def read_routed(folder: str | Path) -> dict[str, Any]:
    """The routed.json of `folder`; raises LorafuseError when it is missing or not ours,
    and FileFormatError naming the file and field when a field is missing or mistyped."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise LorafuseError(f"{folder} is not a routed model folder ({CONFIG_NAME} is missing)")
    config = read_json(path, what="routed model")
    head = config if isinstance(config, dict) else {}
    if head.get("format") != FORMAT or head.get("version") != VERSION:
        raise LorafuseError(
            f"{path} is not a {FORMAT} v{VERSION} file (format {head.get('format')!r}, "
            f"version {head.get('version')!r})"
        )
    check(config, RoutedFile, path, what="routed model")
    return config


def read_routers(folder: str | Path) -> dict[str, Tensor]:
    """The router tensors of `folder` (`<module path>.<tensor>` -> tensor); raises
    LorafuseError when routers.safetensors is missing or not a readable safetensors file."""
    from safetensors.torch import load_file

    path = Path(folder) / ROUTERS_NAME
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise LorafuseError(f"{path} is missing; save the routed model again") from None
    except Exception as e:  # safetensors' own errors: a truncated or foreign file
        raise LorafuseError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no detail'}); save the routed model again"
        ) from None
