"""Import an mttl expert library (the paper authors' format) as PEFT adapter folders.

mttl (github.com/microsoft/mttl) keeps a library, in a hub repository or a local folder,
as two files per expert:
- `<name>.meta`: `torch.save` of a dict with `expert_name`, `expert_task_name` (tasks,
  comma-separated for a cluster expert), `expert_model` (the base model),
  `expert_config` ({lora_rank, lora_alpha, ..., "__model_modifier__": "lora"}),
  `training_config` (a dict; older experts keep the LoRA settings only there) and
  `expert_deleted`;
- `<name>.ckpt`: `torch.save` of {"<module>.lora_a": (D, R), "<module>.lora_b": (R, O)},
  module paths relative to the transformers model; delta (O, D) = (alpha / R) (a @ b)^T.
PEFT keeps the same factors transposed, lora_A.weight (R, D) = a^T and lora_B.weight
(O, R) = b^T, with scaling lora_alpha / r: the conversion is exact. Both files are read
with `torch.load(weights_only=True)` only, never as arbitrary pickles.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from lorafuse.errors import ExpertError, LorafuseWarning
from lorafuse.formats.peft import KEY_PREFIX, METADATA_NAME, SAFETENSORS_NAME, adapter_config
from lorafuse.formats.schema import FileModel, Finite, PositiveInt, check, one_of
from lorafuse.io import atomic_dir

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[ab])$")


@dataclass
class MttlExpert:
    """One expert of an mttl library: its files and what its metadata says."""

    name: str
    ckpt: Path
    tasks: list[str]
    base_model: str | None = None
    rank: int | None = None
    alpha: float | None = None
    meta_file: Path | None = None


def resolve_library(source: str | Path) -> Path:
    """The folder of an mttl library: `source` itself, or a hub repository fetched.

    A hub id (`owner/name`, not an existing path) is downloaded with huggingface_hub
    (only its .meta and .ckpt files; network needed). Raises ExpertError when `source` is
    neither a folder nor a reachable repository.
    """
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise ExpertError(f"mttl library {path} is a file; pass the folder of .meta/.ckpt")
        return path
    if not HUB_ID.fullmatch(str(source)):
        raise ExpertError(f"mttl library {source} does not exist (neither a folder nor a hub id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=["*.meta", "*.ckpt"]))
    except Exception as e:  # offline, not found, no access: all mean the same to a user
        raise ExpertError(
            f"could not fetch the mttl library {source} from the hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no detail'}); on a machine with "
            f"network run `huggingface-cli download {source}` and pass the folder"
        ) from None


def read_library(
    folder: str | Path, alpha: float | None = None, use_meta: bool = True
) -> list[MttlExpert]:
    """The experts of the mttl library in `folder`, sorted by name (deleted ones left out).

    `alpha` overrides every expert's lora_alpha. With `use_meta=False` the .meta files
    are not read: each `<name>.ckpt` is an expert whose one task is its name, and `alpha`
    must be given. Raises ExpertError naming the file for a missing, unsafe or malformed
    file, a non-LoRA expert or a duplicate name.
    """
    folder = Path(folder)
    metas = _files(folder, ".meta") if use_meta else []
    if not metas:
        ckpts = _files(folder, ".ckpt")
        if not ckpts:
            raise ExpertError(
                f"{folder} holds no .meta or .ckpt files: it is not an mttl expert library"
            )
        if alpha is None:
            why = "has no .meta files" if use_meta else "is read without its .meta files"
            raise ExpertError(
                f"mttl library {folder} {why}, so the LoRA alpha is unknown; pass --alpha "
                "(the paper's experts: 16)"
            )
        out = []
        for c in ckpts:
            name = safe_name(c.relative_to(folder).with_suffix("").as_posix(), c)
            out.append(MttlExpert(name, c, [name.rsplit("/", 1)[-1]], alpha=alpha))
        return out
    experts: dict[str, MttlExpert] = {}
    for path in metas:
        expert = _from_meta(path, alpha, path.relative_to(folder).with_suffix("").as_posix())
        if expert is None:
            continue
        if expert.name in experts:
            raise ExpertError(
                f"mttl library {folder}: two .meta files name expert {expert.name!r} "
                f"({experts[expert.name].meta_file.name} and {path.name}); remove one"
            )
        experts[expert.name] = expert
    claimed = {e.ckpt.resolve() for e in experts.values()}
    claimed |= {p.with_suffix(".ckpt").resolve() for p in metas}  # deleted experts' too
    orphans = [c for c in _files(folder, ".ckpt") if c.resolve() not in claimed]
    if orphans:
        shown = ", ".join(str(c.relative_to(folder)) for c in orphans[:3])
        warnings.warn(
            f"mttl library {folder}: {len(orphans)} .ckpt file(s) have no .meta and were "
            f"left out ({shown}{' ...' if len(orphans) > 3 else ''}); --ignore-meta reads "
            ".ckpt files alone",
            LorafuseWarning,
            stacklevel=2,
        )
    return [experts[n] for n in sorted(experts)]


def _files(folder: Path, suffix: str) -> list[Path]:
    # mttl keeps sub-folder experts (add_expert("group/x")) as group/x.meta + group/x.ckpt
    # and finds them with **/*.meta; hidden folders (temporary writes, .git) are skipped.
    return sorted(
        p
        for p in folder.rglob(f"*{suffix}")
        if p.is_file() and not any(d.startswith(".") for d in p.relative_to(folder).parts[:-1])
    )


def folder_name(name: str) -> str:
    """The output folder of expert `name`: sub-folder names flattened (`group/x` ->
    `group--x`), so every adapter is a direct child of the output folder."""
    return name.replace("/", "--")


def convert_library(
    experts: list[MttlExpert],
    out: str | Path,
    select: list[str] | None = None,
    force: bool = False,
    source: str | None = None,
) -> list[Path]:
    """Write each expert (or the `select`ed ones) as a PEFT adapter folder `out/<name>/`.

    Each folder holds adapter_config.json (r, lora_alpha, the module paths as
    target_modules, the base model), adapter_model.safetensors and lorafuse_expert.json
    (its tasks). All experts are written under a temporary name and renamed together:
    on any error nothing is left at `out`. Raises ExpertError (bad weights, unknown
    selection, a name that could leave `out`: `..`, absolute; two names mapping to one
    folder) or OutputExistsError (`out` exists and not `force`). A sub-folder expert
    `group/x` is written to `out/group--x/` (`folder_name`).
    """
    if select:
        known = {e.name: e for e in experts}
        missing = [n for n in select if n not in known]
        if missing:
            shown = ", ".join(sorted(known)[:10]) + (" ..." if len(known) > 10 else "")
            raise ExpertError(f"no mttl expert named {', '.join(missing)}; the library has {shown}")
        experts = [known[n] for n in select]
    if not experts:
        raise ExpertError("the mttl library holds no expert to convert (all deleted?)")
    seen: dict[str, str] = {}
    for e in experts:
        safe_name(e.name, e.meta_file or e.ckpt)
        other = seen.setdefault(folder_name(e.name).lower(), e.name)
        if other != e.name:
            raise ExpertError(
                f"experts {other!r} and {e.name!r} would both be written to folder "
                f"{folder_name(e.name)!r} (sub-folders become '--'; names compared without "
                "case); leave one out with --experts"
            )
    with atomic_dir(out, force) as tmp:
        for e in experts:
            tensors, modules, rank = peft_tensors(e)
            folder = tmp / folder_name(e.name)
            folder.mkdir()
            _save_tensors(tensors, folder / SAFETENSORS_NAME)
            cfg = adapter_config(rank, modules, e.base_model, lora_alpha=e.alpha)
            cfg.save_pretrained(str(folder))
            info = {"tasks": e.tasks, "kind": "mttl", "mttl_expert": e.name, "source": source}
            (folder / METADATA_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return [Path(out) / folder_name(e.name) for e in experts]


def peft_tensors(expert: MttlExpert) -> tuple[dict[str, Tensor], list[str], int]:
    """({PEFT key: tensor}, module paths, rank) from the expert's .ckpt, factors transposed.

    lora_a (D, R) -> `base_model.model.<module>.lora_A.weight` (R, D); lora_b (R, O) ->
    `.lora_B.weight` (O, R). Raises ExpertError for a tensor that is not a LoRA factor,
    a module missing one factor, mismatched ranks or non-finite values.
    """
    weights = _load(expert.ckpt, expert.name)
    if not isinstance(weights, dict) or not weights:
        raise ExpertError(f"expert {expert.name}: {expert.ckpt} holds no tensors by name")
    factors: dict[str, dict[str, Tensor]] = {}
    for key, t in weights.items():
        m = _FACTOR.match(str(key))
        if m is None or not isinstance(t, Tensor) or t.dim() != 2:
            raise ExpertError(
                f"expert {expert.name}: {expert.ckpt.name} entry {key!r} is not a LoRA factor "
                "(<module>.lora_a (in, r) or <module>.lora_b (r, out)); only LoRA experts convert"
            )
        if not torch.isfinite(t).all():
            raise ExpertError(f"expert {expert.name}: tensor {key} holds NaN or Inf values")
        factors.setdefault(m.group("module"), {})[m.group("factor")] = t
    tensors: dict[str, Tensor] = {}
    ranks = set()
    for module, ab in sorted(factors.items()):
        if set(ab) != {"a", "b"}:
            gone = "lora_b" if "a" in ab else "lora_a"
            raise ExpertError(
                f"expert {expert.name}: module {module} has no {gone} (tied or missing "
                "parameters are not supported)"
            )
        a, b = ab["a"], ab["b"]  # (D, R), (R, O)
        if a.shape[1] != b.shape[0]:
            raise ExpertError(
                f"expert {expert.name}: module {module} has lora_a {tuple(a.shape)} and "
                f"lora_b {tuple(b.shape)}; expected (in, r) and (r, out)"
            )
        ranks.add(a.shape[1])
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = a.T.contiguous()  # (R, D)
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = b.T.contiguous()  # (O, R)
    if len(ranks) > 1 or (expert.rank is not None and ranks != {expert.rank}):
        raise ExpertError(
            f"expert {expert.name}: its factors have rank {sorted(ranks)} but its metadata "
            f"says lora_rank={expert.rank}; the .meta and .ckpt do not belong together"
        )
    return tensors, sorted(factors), ranks.pop()


Tasks = one_of("a string (comma-separated tasks), a list of strings or null", str, list[str], None)


class MttlConfig(FileModel):
    """The LoRA settings of an mttl expert (its expert_config, or older: training_config)."""

    lora_rank: PositiveInt | None = None
    lora_alpha: Finite | None = None
    modifier: str | None = Field(None, alias="__model_modifier__")
    model_modifier: str | None = None
    finetune_task_name: Tasks = None
    model: str | None = None


class MttlMeta(FileModel):
    """An mttl `.meta` file as lorafuse reads it (other keys are kept and ignored)."""

    expert_name: str | None = None
    expert_task_name: Tasks = None
    expert_model: str | None = None
    expert_config: MttlConfig | None = None
    training_config: MttlConfig | None = None
    expert_deleted: bool | None = None


def safe_name(name: str, source: Path | str) -> str:
    """`name` when it is a relative path inside a folder (`a` or `a/b`), else ExpertError.

    Refused: empty, absolute (`/x`, `C:`), `.` or `..` parts, empty parts (`a//b`), a
    backslash or a control character; the message names the expert and `source`.
    """
    parts = name.split("/")
    bad = (
        not name
        or name.startswith("/")
        or re.match(r"^[A-Za-z]:", name) is not None
        or any(p in ("", ".", "..") for p in parts)
        or "\\" in name
        or any(ord(c) < 32 for c in name)
    )
    if bad:
        raise ExpertError(
            f"expert {name!r} ({source}): its name is not a plain relative name (empty, "
            "absolute, '.', '..' or empty parts, a backslash or a control character), so it "
            "could write outside the output folder; rename the expert in its .meta"
        )
    return name


def _from_meta(path: Path, alpha: float | None, where: str) -> MttlExpert | None:
    # The expert a .meta file describes (`where`: its path in the library, no suffix), or
    # None if it is marked deleted.
    meta = check(_load(path, path.stem), MttlMeta, path, ExpertError, f"expert {where}")
    if meta.expert_deleted:
        return None
    name = safe_name(meta.expert_name or where, path)
    training = meta.training_config or MttlConfig()
    config = meta.expert_config or training
    modifier = config.modifier if config.modifier is not None else config.model_modifier
    if modifier not in (None, "lora"):
        raise ExpertError(
            f"expert {name} ({path.name}) is a {modifier!r} expert, not LoRA; only LoRA "
            "experts convert to PEFT adapters"
        )
    if alpha is None and config.lora_alpha is None:
        raise ExpertError(f"expert {name}: {path.name} records no lora_alpha; pass --alpha")
    beside = [path.with_suffix(".ckpt")]
    if "/" not in name:  # a sub-folder expert's weights lie beside its .meta, as <stem>.ckpt
        beside.insert(0, path.with_name(f"{name}.ckpt"))
    ckpt = next((c for c in beside if c.is_file()), None)
    if ckpt is None:
        raise ExpertError(
            f"expert {name}: {path.name} has no {name}.ckpt beside it (an incomplete "
            "download?); fetch the library again"
        )
    tasks = meta.expert_task_name or training.finetune_task_name or name
    tasks = ",".join(tasks) if isinstance(tasks, list) else tasks
    return MttlExpert(
        name=name,
        ckpt=ckpt,
        tasks=[t.strip() for t in tasks.split(",") if t.strip()],
        base_model=meta.expert_model or training.model,
        rank=config.lora_rank,
        alpha=float(alpha if alpha is not None else config.lora_alpha),
        meta_file=path,
    )


def _load(path: Path, name: str) -> Any:
    # torch.load with weights_only=True; a clear ExpertError for anything it refuses.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Unsupported global" in str(e) or "weights_only" in str(e):
            try:
                found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                detail = f"it pickles Python objects ({', '.join(found[:5])})"
            except Exception:
                pass
            fix = (
                "convert from the weights alone with --ignore-meta --alpha A"
                if path.suffix == ".meta"
                else "re-save it as a plain dict of tensors"
            )
            raise ExpertError(
                f"expert {name}: {path} cannot be read safely ({detail}); lorafuse loads "
                f"only plain tensors and data (weights_only=True): {fix}"
            ) from None
        raise ExpertError(f"expert {name}: {path} is unreadable or truncated ({detail})") from None


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
