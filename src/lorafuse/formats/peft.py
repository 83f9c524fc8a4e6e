"""Read and write PEFT LoRA adapter folders (adapter_config.json + weights).

The on-disk format is PEFT's: keys `base_model.model.<module>.lora_A.weight` of shape
(R, D) and `.lora_B.weight` of shape (O, R); scaling = alpha / r (alpha / sqrt(r) with
rsLoRA), with `rank_pattern` / `alpha_pattern` overriding r and alpha per module.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafuse.errors import ExpertError

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
        children = sorted(c for c in p.iterdir() if is_expert_dir(c)) if p.is_dir() else []
        if not children:
            raise ExpertError(
                f"{p} is not a PEFT adapter folder (no {CONFIG_NAME}) and holds no adapter "
                "folders; pass folders made by PEFT's save_pretrained"
            )
        found.extend(children)
    return found


def read_config(path: Path) -> ExpertConfig:
    """Read and validate `path/adapter_config.json`; refuse anything but plain LoRA."""
    cfg_path = path / CONFIG_NAME
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ExpertError(f"expert {path.name}: missing {cfg_path}") from None
    except json.JSONDecodeError as e:
        raise ExpertError(f"expert {path.name}: {cfg_path} is not valid JSON ({e})") from None
    name = path.name
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ExpertError(f"expert {name}: peft_type is {peft_type}; only LoRA is supported")
    if raw.get("use_dora"):
        raise ExpertError(
            f"expert {name}: a DoRA adapter (use_dora=true) is not plain LoRA and cannot be "
            "mixed as factors; retrain it without DoRA"
        )
    if raw.get("lora_bias"):
        raise ExpertError(f"expert {name}: lora_bias=true is not supported (plain LoRA only)")
    if raw.get("modules_to_save"):
        raise ExpertError(
            f"expert {name}: modules_to_save={raw['modules_to_save']} trains full modules "
            "besides LoRA, which cannot be mixed; use adapters without modules_to_save"
        )
    if "r" not in raw or "lora_alpha" not in raw:
        raise ExpertError(f"expert {name}: {cfg_path} lacks 'r' or 'lora_alpha'")
    return ExpertConfig(
        path=path,
        r=int(raw["r"]),
        lora_alpha=float(raw["lora_alpha"]),
        use_rslora=bool(raw.get("use_rslora", False)),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        base_model=raw.get("base_model_name_or_path"),
        target_modules=raw.get("target_modules"),
        raw=raw,
    )


def read_metadata(path: Path) -> dict[str, Any]:
    """lorafuse's side file of an expert (its tasks), or {} when there is none."""
    meta = path / METADATA_NAME
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise ExpertError(f"expert {path.name}: {meta} is not valid JSON ({e})") from None


def parse_key(key: str, expert: str) -> tuple[str, str]:
    """Split an on-disk key into (module path, 'A' or 'B'); refuse non-LoRA tensors."""
    short = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key
    m = _FACTOR_RE.match(short)
    if m:
        return m.group("module"), m.group("factor")
    if "lora_magnitude_vector" in short:
        raise ExpertError(f"expert {expert}: tensor {key} is a DoRA magnitude; not plain LoRA")
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
