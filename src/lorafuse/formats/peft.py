"""Read and write PEFT LoRA adapter folders (adapter_config.json + weights).

The on-disk format is PEFT's: keys `base_model.model.<module>.lora_A.weight` of shape
(R, D) and `.lora_B.weight` of shape (O, R); scaling = alpha / r (alpha / sqrt(r) with
rsLoRA), with `rank_pattern` / `alpha_pattern` overriding r and alpha per module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from lorafuse.errors import ExpertError
from lorafuse.formats.schema import FileModel, Finite, PositiveInt, check, one_of, read_json

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
METADATA_NAME = "lorafuse_expert.json"
KEY_PREFIX = "base_model.model."
_FACTOR_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class ExpertConfig:
    """The fields of a PEFT LoRA adapter_config.json that lorafuse uses."""

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None
    target_modules: Any = None
    raw: dict[str, Any] = field(default_factory=dict)

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """The (r, alpha) PEFT uses for `module`, after rank_pattern/alpha_pattern."""
        r = self.r
        alpha = self.lora_alpha
        key = _pattern_key(self.rank_pattern, module)
        if key is not None:
            r = int(self.rank_pattern[key])
        key = _pattern_key(self.alpha_pattern, module)
        if key is not None:
            alpha = float(self.alpha_pattern[key])
        return r, alpha

    def scaling(self, module: str) -> float:
        """The LoRA scaling of `module`: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    # PEFT's rule: a pattern matches a module path ending in `.<pattern>` or equal to it.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def is_expert_dir(path: Path) -> bool:
    """True when `path` is a folder holding an adapter_config.json."""
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def find_expert_dirs(paths: list[str | Path]) -> list[Path]:
    """Expand each path to expert folders: an adapter folder, or a folder of them.

    Raises ExpertError naming a path that is neither.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if is_expert_dir(p):
            found.append(p)
            continue
        if not p.exists():
            raise ExpertError(f"expert path {p} does not exist")
        # hidden names are skipped: temporary folders of a writer, .git, caches
        visible = sorted(c for c in p.iterdir() if not c.name.startswith(".")) if p.is_dir() else []
        children = [c for c in visible if is_expert_dir(c)]
        if not children:
            raise ExpertError(
                f"{p} is not a PEFT adapter folder (no {CONFIG_NAME}) and holds no adapter "
                "folders; pass folders made by PEFT's save_pretrained"
            )
        found.extend(children)
    return found


class PeftKind(FileModel):
    """The fields of adapter_config.json that say whether it is plain LoRA (read first)."""

    peft_type: str = "LORA"
    use_dora: bool = False
    lora_bias: bool = False
    modules_to_save: list[str] | None = None
    target_parameters: list[str] | None = None
    trainable_token_indices: Any = None


def _valid_patterns(patterns: dict[str, Any] | None) -> dict[str, Any] | None:
    for key in patterns or {}:
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"key {key!r} is not a regular expression ({e})") from None
    return patterns


TargetModules = one_of("a list of strings, a string or null", list[str], str, None)
Patterns = AfterValidator(_valid_patterns)


class AdapterConfigFile(PeftKind):
    """adapter_config.json as lorafuse reads it (PEFT writes more keys; they are kept)."""

    r: PositiveInt
    lora_alpha: Finite
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: Annotated[dict[str, PositiveInt] | None, Patterns] = None
    alpha_pattern: Annotated[dict[str, Finite] | None, Patterns] = None
    target_modules: TargetModules = None
    base_model_name_or_path: str | None = None


class ExpertMetaFile(FileModel):
    """lorafuse_expert.json as lorafuse reads it: the expert's tasks (other keys are kept)."""

    tasks: list[str] = Field(default_factory=list)


def read_config(path: Path) -> ExpertConfig:
    """Read and validate `path/adapter_config.json`; refuse anything but plain LoRA.

    Raises ExpertError naming the file for a missing or invalid file, a field of the
    wrong type or value (r a positive integer, lora_alpha a finite number, ...), or an
    adapter that is not plain LoRA (DoRA, lora_bias, modules_to_save, another peft_type).
    """
    cfg_path = path / CONFIG_NAME
    name = path.name
    if not cfg_path.is_file():
        raise ExpertError(f"expert {name}: missing {cfg_path}")
    raw = read_json(cfg_path, ExpertError, f"expert {name}")
    kind = check(raw, PeftKind, cfg_path, ExpertError, f"expert {name}")
    peft_type = kind.peft_type.upper()
    if peft_type != "LORA":
        raise ExpertError(f"expert {name}: peft_type is {peft_type}; only LoRA is supported")
    if kind.use_dora:
        raise ExpertError(
            f"expert {name}: a DoRA adapter (use_dora=true) is not plain LoRA and cannot be "
            "mixed as factors; retrain it without DoRA"
        )
    if kind.lora_bias:
        raise ExpertError(f"expert {name}: lora_bias=true is not supported (plain LoRA only)")
    if kind.modules_to_save:
        raise ExpertError(
            f"expert {name}: modules_to_save={kind.modules_to_save} trains full modules "
            "besides LoRA, which cannot be mixed; use adapters without modules_to_save"
        )
    if kind.target_parameters:
        raise ExpertError(
            f"expert {name}: target_parameters={kind.target_parameters[:3]} puts LoRA on "
            "parameters (such as a mixture-of-experts layer's fused expert weights), not on "
            "Linear layers; lorafuse fuses LoRA on Linear/Conv1D modules only: use experts "
            "trained with target_modules"
        )
    if kind.trainable_token_indices:
        raise ExpertError(
            f"expert {name}: trainable_token_indices trains embedding rows besides LoRA, "
            "which cannot be mixed; use adapters without trainable tokens"
        )
    cfg = check(raw, AdapterConfigFile, cfg_path, ExpertError, f"expert {name}")
    return ExpertConfig(
        path=path,
        r=cfg.r,
        lora_alpha=float(cfg.lora_alpha),
        use_rslora=cfg.use_rslora,
        fan_in_fan_out=cfg.fan_in_fan_out,
        rank_pattern=dict(cfg.rank_pattern or {}),
        alpha_pattern={k: float(v) for k, v in (cfg.alpha_pattern or {}).items()},
        base_model=cfg.base_model_name_or_path,
        target_modules=cfg.target_modules,
        raw=raw,
    )


def read_metadata(path: Path) -> dict[str, Any]:
    """lorafuse's side file of an expert (its tasks), or {} when there is none.

    Raises ExpertError naming the file when it is not JSON, not an object, or its
    `tasks` is not a list of strings.
    """
    meta = path / METADATA_NAME
    if not meta.is_file():
        return {}
    raw = read_json(meta, ExpertError, f"expert {path.name}")
    check(raw, ExpertMetaFile, meta, ExpertError, f"expert {path.name}")
    return raw


def parse_key(key: str, expert: str) -> tuple[str, str]:
    """Split an on-disk key into (module path, 'A' or 'B'); refuse non-LoRA tensors."""
    short = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key
    m = _FACTOR_RE.match(short)
    if m:
        return m.group("module"), m.group("factor")
    if "lora_magnitude_vector" in short:
        raise ExpertError(f"expert {expert}: tensor {key} is a DoRA magnitude; not plain LoRA")
    if ".base_layer." in short:
        raise ExpertError(
            f"expert {expert}: tensor {key} is a full copy of a base layer, which PEFT saves "
            "when an adapter adapts an embedding (or resized it); only Linear/Conv1D LoRA "
            "is supported"
        )
    if "lora_embedding" in short:
        raise ExpertError(
            f"expert {expert}: tensor {key} adapts an embedding; only Linear/Conv1D LoRA "
            "is supported"
        )
    raise ExpertError(
        f"expert {expert}: tensor {key} is not a LoRA factor (lora_A/lora_B weight); "
        "plain LoRA adapters only (no biases, modules_to_save or trainable tokens)"
    )


def same_base(a: str | None, b: str | None) -> bool:
    """Whether two recorded base-model ids name the same model (compared by last part)."""
    if not a or not b:
        return True
    return Path(a.rstrip("/")).name == Path(b.rstrip("/")).name


def adapter_config(
    r: int,
    target_modules: list[str],
    base_model: str | None,
    fan_in_fan_out: bool = False,
    lora_alpha: float | None = None,
):
    """A PEFT LoraConfig for an exported adapter (scaling 1 unless lora_alpha given)."""
    from peft import LoraConfig

    cfg = LoraConfig(
        r=r,
        lora_alpha=float(r if lora_alpha is None else lora_alpha),
        target_modules=sorted(target_modules),
        lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )
    cfg.base_model_name_or_path = base_model
    return cfg
