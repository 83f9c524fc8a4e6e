"""ExpertLibrary: N PEFT LoRA experts, validated and stacked per target module.

Per target module the library holds A (N, R, D), B (N, O, R), scale (N,) and rank (N,),
where R is the largest rank of any expert on that module and lower-rank experts are
zero-padded (exact: the padded rows and columns contribute nothing).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorafuse.errors import ExpertError, LibraryMismatchError
from lorafuse.factors import StackedModule
from lorafuse.formats.hub import expand_lists, fetch_adapter, is_hub_ref, parse_ref
from lorafuse.formats.peft import (
    BIN_NAME,
    SAFETENSORS_NAME,
    ExpertConfig,
    find_expert_dirs,
    parse_key,
    read_config,
    read_metadata,
    same_base,
)


@dataclass
class Expert:
    """What the library knows of one expert besides its tensors."""

    name: str
    path: Path | None = None
    tasks: list[str] = field(default_factory=list)
    base_model: str | None = None
    r: int = 0
    lora_alpha: float = 0.0
    use_rslora: bool = False
    source: str | None = None  # the hub id it was fetched from (None: a local folder)


class ExpertLibrary:
    """N LoRA experts stacked per target module; load with `ExpertLibrary.load`."""

    def __init__(self, experts: list[Expert], modules: dict[str, StackedModule]):
        if not experts:
            raise LibraryMismatchError("an expert library needs at least one expert")
        names = [e.name for e in experts]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise LibraryMismatchError(f"expert names must be unique; repeated: {dup}")
        for name, mod in modules.items():
            if mod.A.shape[0] != len(experts) or mod.B.shape[0] != len(experts):
                raise LibraryMismatchError(
                    f"module {name}: stacked tensors hold {mod.A.shape[0]} experts, "
                    f"the library {len(experts)}"
                )
        self.experts = experts
        self.modules = modules

    # ---- loading ------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        paths: Sequence[str | Path],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        base_model: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> ExpertLibrary:
        """Load PEFT adapters into one stacked library.

        `paths` holds adapter folders, folders of them, hub ids (`owner/name`,
        `owner/name@revision`, `owner/name/sub/folder`: fetched into the hub cache, read
        from it offline) and `.txt` files listing any of these one per line.
        `progress(1)` is called after each hub id is fetched.

        Reads each weights file once with safetensors (or `torch.load(weights_only=True)`
        for `.bin`) and copies each tensor straight into its slot of the stacked result.
        Experts may adapt different modules: the library holds the union, and an expert's
        factors are zero on a module it does not adapt (rank 0 there), so it contributes
        exactly nothing there, as PEFT does with that adapter alone. Raises ExpertError
        for an unreadable or non-LoRA expert and LibraryMismatchError when experts differ
        in shapes or base model; each message names the expert and module.
        """
        dirs, labels, sources = expert_dirs(paths, progress)
        names = unique_names(labels)
        configs = [read_config(d) for d in dirs]
        _check_base(names, configs, base_model)
        shapes = [read_shapes(d, n) for d, n in zip(dirs, names)]
        layout = _check_layout(names, configs, shapes)
        N = len(dirs)
        modules: dict[str, StackedModule] = {}
        for m, (R, D, O) in layout.items():
            modules[m] = StackedModule(
                A=torch.zeros(N, R, D, dtype=dtype, device=device),
                B=torch.zeros(N, O, R, dtype=dtype, device=device),
                scale=torch.tensor([c.scaling(m) for c in configs], dtype=torch.float32),
                # rank 0 (and zero factors): the expert does not adapt this module
                rank=torch.tensor([s[m][0][0] if m in s else 0 for s in shapes]),
                fan_in_fan_out=configs[0].fan_in_fan_out,
            )
        for i, (d, n) in enumerate(zip(dirs, names)):
            for key, tensor in _iter_tensors(d, n):
                m, factor = parse_key(key, n)
                if not torch.isfinite(tensor).all():
                    raise ExpertError(
                        f"expert {n}: tensor {key} (module {m}) holds NaN or Inf values; "
                        "the adapter is corrupt or diverged in training"
                    )
                mod = modules[m]
                r = tensor.shape[0] if factor == "A" else tensor.shape[1]
                if factor == "A":
                    mod.A[i, :r].copy_(tensor)
                else:
                    mod.B[i, :, :r].copy_(tensor)
        experts = []
        for d, n, c, src in zip(dirs, names, configs, sources):
            meta = read_metadata(d)
            experts.append(
                Expert(
                    name=n,
                    path=d,
                    source=src,
                    tasks=list(meta.get("tasks", [])),
                    base_model=c.base_model,
                    r=c.r,
                    lora_alpha=c.lora_alpha,
                    use_rslora=c.use_rslora,
                )
            )
        return cls(experts, modules)

    # ---- views ----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Expert names in library order."""
        return [e.name for e in self.experts]

    def __len__(self) -> int:
        return len(self.experts)

    @property
    def base_model(self) -> str | None:
        """The recorded base model id of the experts (the first one recorded)."""
        return next((e.base_model for e in self.experts if e.base_model), None)

    def index(self, names: Sequence[str]) -> list[int]:
        """Positions of the named experts; raises LibraryMismatchError for unknown names."""
        pos = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in pos]
        if missing:
            raise LibraryMismatchError(
                f"unknown expert(s) {missing}; the library has {self.names[:20]}"
                + (" ..." if len(self) > 20 else "")
            )
        return [pos[n] for n in names]

    def subset(self, names_or_index: Sequence[str] | Sequence[int]) -> ExpertLibrary:
        """A library of the chosen experts (by name or position), in the order given."""
        idx = list(names_or_index)
        if idx and isinstance(idx[0], str):
            idx = self.index(idx)  # type: ignore[arg-type]
        t = torch.tensor(idx, dtype=torch.long)
        return ExpertLibrary(
            [self.experts[i] for i in idx], {m: s.select(t) for m, s in self.modules.items()}
        )

    def to(self, device=None, dtype=None) -> ExpertLibrary:
        """A copy of the library with factors on `device` in `dtype`."""
        return ExpertLibrary(
            list(self.experts), {m: s.to(device, dtype) for m, s in self.modules.items()}
        )

    def expert_params(self) -> list[int]:
        """Number of LoRA parameters of each expert (true ranks, padding excluded)."""
        counts = [0] * len(self)
        for mod in self.modules.values():
            _, _, D, O = mod.shape
            for i, r in enumerate(mod.rank.tolist()):
                counts[i] += r * (D + O)
        return counts

    def module_summary(self) -> list[str]:
        """Short target-module names (the last path component), sorted and unique."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})

    def covered(self, i: int) -> list[str]:
        """The modules expert `i` adapts (rank > 0 there), in library order."""
        return [m for m, mod in self.modules.items() if int(mod.rank[i]) > 0]

    def coverage(self) -> dict[str, list[int]]:
        """Short module name -> per expert, how many modules of that name it adapts."""
        table: dict[str, list[int]] = {}
        for m, mod in self.modules.items():
            row = table.setdefault(m.rsplit(".", 1)[-1], [0] * len(self))
            for i, r in enumerate(mod.rank.tolist()):
                row[i] += r > 0
        return dict(sorted(table.items()))

    def describe(self) -> list[dict[str, Any]]:
        """One dict per expert: name, rank, alpha, scaling, modules, params, tasks.

        Rank and scaling are over the modules the expert adapts (a list when they differ
        from module to module, by rank_pattern / alpha_pattern).
        """
        params = self.expert_params()
        rows = []
        for i, e in enumerate(self.experts):
            mine = [self.modules[m] for m in self.covered(i)]
            scales = sorted({round(float(mod.scale[i]), 6) for mod in mine})
            ranks = sorted({int(mod.rank[i]) for mod in mine})
            short = sorted({m.rsplit(".", 1)[-1] for m in self.covered(i)})
            rows.append(
                {
                    "name": e.name,
                    "rank": ranks[0] if len(ranks) == 1 else ranks,
                    "alpha": e.lora_alpha,
                    "scaling": scales[0] if len(scales) == 1 else scales,
                    "rslora": e.use_rslora,
                    "modules": ",".join(short),
                    "n_modules": len(mine),
                    "params": params[i],
                    "tasks": e.tasks,
                    "base_model": e.base_model,
                }
            )
        return rows


# ---- loading helpers -------------------------------------------------------------------
def expert_dirs(
    paths: Sequence[str | Path], progress: Callable[[int], None] | None = None
) -> tuple[list[Path], list[tuple[str, str]], list[str | None]]:
    """Expert folders for `paths` (folders, folders of them, hub ids, .txt lists), in
    order; per folder a (short, long) name and the hub id it came from (None: local)."""
    dirs, labels, sources = [], [], []
    for entry in expand_lists(list(paths)):
        ref = parse_ref(str(entry)) if is_hub_ref(entry) else None
        if ref is not None:
            dirs.append(fetch_adapter(ref))
            short = (ref.subfolder or ref.repo).rsplit("/", 1)[-1]
            labels.append((short, str(ref)))
            sources.append(str(ref))
            if progress is not None:
                progress(1)
            continue
        for d in find_expert_dirs([entry]):
            dirs.append(d)
            labels.append((d.name, f"{d.parent.name}/{d.name}"))
            sources.append(None)
    return dirs, labels, sources


def unique_names(labels: list[tuple[str, str]]) -> list[str]:
    """Each expert's short name (folder, or repo/sub-folder name), or its long one when
    two experts share the short one."""
    counts = Counter(s for s, _ in labels)
    return [s if counts[s] == 1 else long for s, long in labels]


def _check_base(names: list[str], configs: list[ExpertConfig], base_model: str | None) -> None:
    ref_name, ref = None, base_model
    for n, c in zip(names, configs):
        if ref is None and c.base_model:
            ref_name, ref = n, c.base_model
        elif not same_base(ref, c.base_model):
            against = f"expert {ref_name}'s" if ref_name else "the library's"
            raise LibraryMismatchError(
                f"expert {n} was trained on base model {c.base_model!r}, but {against} base "
                f"model is {ref!r}; experts must share one base model"
            )


def _weights_file(path: Path, name: str) -> Path:
    for f in (path / SAFETENSORS_NAME, path / BIN_NAME):
        if f.is_file():
            return f
    raise ExpertError(
        f"expert {name}: {path} has no {SAFETENSORS_NAME} (or {BIN_NAME}); "
        "the adapter was not saved completely"
    )


@contextlib.contextmanager
def _open_weights(path: Path, name: str):
    f = _weights_file(path, name)
    try:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt", device="cpu") as h:
                yield f, _SafetensorsHandle(h)
        else:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                sd = torch.load(f, map_location="cpu", weights_only=True)
            yield f, _DictHandle(sd)
    except ExpertError:
        raise
    except Exception as e:  # safetensors/torch raise many types for a corrupt file
        raise ExpertError(
            f"expert {name}: cannot read {f} ({type(e).__name__}: {e}); the file is missing, "
            "truncated or not a weights file: re-save the adapter"
        ) from None


class _DictHandle:
    # The slice of safe_open's interface lorafuse uses, over a loaded state dict.
    def __init__(self, sd: dict[str, Tensor]):
        self.sd = sd

    def names(self) -> list[str]:
        return list(self.sd)

    def get_tensor(self, key: str) -> Tensor:
        return self.sd[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.sd[key].shape)


class _SafetensorsHandle:
    def __init__(self, handle):
        self.h = handle

    def names(self) -> list[str]:
        return list(self.h.keys())

    def get_tensor(self, key: str) -> Tensor:
        return self.h.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.h.get_slice(key).get_shape())


def read_shapes(path: Path, name: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """module -> (A shape (r, D), B shape (O, r)) of one expert, from the file's header
    only (no tensor is read); ExpertError for an unreadable or non-LoRA file."""
    found: dict[str, dict[str, tuple[int, ...]]] = {}
    with _open_weights(path, name) as (f, h):
        for key in h.names():
            m, factor = parse_key(key, name)
            found.setdefault(m, {})[factor] = h.shape(key)
    out = {}
    for m, fs in found.items():
        if set(fs) != {"A", "B"}:
            missing = "lora_B" if "A" in fs else "lora_A"
            raise ExpertError(f"expert {name}: module {m} has no {missing} weight in {f}")
        a, b = fs["A"], fs["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise ExpertError(
                f"expert {name}: module {m} has lora_A {a} and lora_B {b}; expected (r, in) "
                "and (out, r) with the same r"
            )
        out[m] = (a, b)
    if not out:
        raise ExpertError(f"expert {name}: {f} holds no LoRA tensors")
    return out


def _check_layout(names, configs, shapes) -> dict[str, tuple[int, int, int]]:
    # module -> (R, D, O) over the union of the experts' modules, after checking that
    # every expert adapting a module agrees on its shape (the same base model).
    first: dict[str, tuple[str, int, int]] = {}  # module -> (expert, D, O) first seen
    for n, c, s in zip(names, configs, shapes):
        for m, (a, b) in s.items():
            ref_name, D0, O0 = first.setdefault(m, (n, a[1], b[0]))
            if a[1] != D0 or b[0] != O0:
                raise LibraryMismatchError(
                    f"expert {n}, module {m}: shape in={a[1]} out={b[0]} differs from expert "
                    f"{ref_name}'s in={D0} out={O0}; experts must come from the same base model"
                )
            r_cfg, _ = c.rank_alpha(m)
            if r_cfg != a[0]:
                raise ExpertError(
                    f"expert {n}, module {m}: adapter_config.json gives rank {r_cfg} but the "
                    f"tensors have rank {a[0]}; the config does not belong to these weights"
                )
        if c.fan_in_fan_out != configs[0].fan_in_fan_out:
            raise LibraryMismatchError(
                f"expert {n}: fan_in_fan_out={c.fan_in_fan_out} differs from expert "
                f"{names[0]}; experts must come from the same base architecture"
            )
    # first expert's modules in its order, then modules other experts add, as first seen
    return {m: (max(s[m][0][0] for s in shapes if m in s), D, O) for m, (_, D, O) in first.items()}


def _iter_tensors(path: Path, name: str) -> Iterator[tuple[str, Tensor]]:
    with _open_weights(path, name) as (f, h):
        for key in h.names():
            try:
                t = h.get_tensor(key)
            except Exception as e:
                raise ExpertError(
                    f"expert {name}: cannot read tensor {key} from {f} ({e}); the file is "
                    "truncated or corrupt: re-save the adapter"
                ) from None
            yield key, t
