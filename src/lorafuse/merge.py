"""Fold static coefficients into one adapter and export it (PEFT adapter or full model).

- `factors` space (the paper): A* = sum_i l_i A_i, B* = sum_i l_i s_i B_i, rank R.
- `deltas` space: sum_i l_i s_i B_i A_i exactly, by concatenation (rank sum_i r_i), or
  truncated to rank K by an SVD computed from the factors.
Every export has scaling 1 (lora_alpha = r), so the tensors carry the experts' scalings.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorafuse.errors import LorafuseError, LorafuseWarning
from lorafuse.formats.peft import KEY_PREFIX, METADATA_NAME, SAFETENSORS_NAME, adapter_config
from lorafuse.io import atomic_dir
from lorafuse.layer import base_shape, check_space
from lorafuse.library import ExpertLibrary
from lorafuse.linalg import truncate_product
from lorafuse.values import check_values

Weights = Tensor | Sequence[float] | Mapping[str, Tensor | Sequence[float]] | None


@dataclass
class MergedAdapter:
    """One LoRA adapter (scaling 1): module -> (A (r, D), B (O, r))."""

    modules: dict[str, tuple[Tensor, Tensor]]
    space: str
    fan_in_fan_out: bool = False
    base_model: str | None = None
    energy: dict[str, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The largest rank over modules (the exported adapter's r)."""
        return max(A.shape[0] for A, _ in self.modules.values())

    def min_energy(self) -> float | None:
        """The smallest fraction of spectral energy kept by any module (None: exact)."""
        return min(self.energy.values()) if self.energy else None

    def as_library(self, name: str = "merged") -> ExpertLibrary:
        """The adapter as a one-expert library (scale 1, each module at its own rank, zero-
        padded to the largest): attached with coefficient 1 it adds exactly B @ A per module,
        as PEFT adds the saved adapter."""
        from lorafuse.factors import StackedModule
        from lorafuse.library import Expert

        R = self.rank
        modules = {}
        for module, (A, B) in self.modules.items():
            r, D = A.shape
            Ap = torch.zeros(1, R, D)  # (1, R, D)
            Ap[0, :r] = A
            Bp = torch.zeros(1, B.shape[0], R)  # (1, O, R)
            Bp[0, :, :r] = B
            modules[module] = StackedModule(
                Ap, Bp, torch.ones(1), torch.tensor([r]), fan_in_fan_out=self.fan_in_fan_out
            )
        expert = Expert(name, base_model=self.base_model, r=R, lora_alpha=float(R))
        return ExpertLibrary([expert], modules)


def resolve_weights(library: ExpertLibrary, weights: Weights) -> dict[str, Tensor]:
    """Per-module coefficient vectors (N,) from None (uniform), one vector, or a mapping.

    Raises LorafuseError on a wrong length, a non-finite value or unknown modules.
    """
    N = len(library)
    if weights is None:
        weights = torch.full((N,), 1.0 / N)
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(library.modules))
        missing = sorted(set(library.modules) - set(weights))
        if unknown or missing:
            raise LorafuseError(
                f"per-layer weights must name every module: unknown {unknown[:3]}, "
                f"missing {missing[:3]}"
            )
        out = {m: _vector(w, N) for m, w in weights.items()}
    else:
        w = _vector(weights, N)
        out = dict.fromkeys(library.modules, w)
    return out


def merged_tasks(library: ExpertLibrary, per_module: Mapping[str, Tensor]) -> list[str]:
    """The tasks of the experts a merge uses: those with a non-zero weight in any module."""
    used = {n for w in per_module.values() for n, x in zip(library.names, w.tolist()) if x != 0}
    return sorted({t for e in library.experts if e.name in used for t in e.tasks})


def _warn_about_weights(per_module: dict[str, Tensor], space: str) -> None:
    # Refuse weights that merge nothing; say when factors-space weights rescale the update.
    for module, w in per_module.items():
        if not bool((w != 0).any()):
            raise LorafuseError(
                f"merge weights are all zero (module {module}): the merged adapter would do "
                "nothing; give at least one non-zero weight"
            )
    total = {round(float(w.sum()), 6) for w in per_module.values()}
    if space == "factors" and any(abs(t - 1) > 1e-6 for t in total):
        t = max(total, key=lambda v: abs(v - 1))
        warnings.warn(
            f"merge weights sum to {t:g}, not 1: in factors space both A and B are weighted, "
            f"so the update scales by about the sum squared ({t * t:g}x the experts' scale); "
            "weights that sum to 1 keep it, or use --space deltas for a linear sum",
            LorafuseWarning,
            stacklevel=3,
        )


def _vector(w, N: int) -> Tensor:
    v = torch.as_tensor(w, dtype=torch.float32).detach().cpu()
    fix = "give one finite weight per expert, in library order"
    check_values(v, "merge weights", [(N,)], f"{N} numbers (one per expert)", fix)
    return v


def merge(
    library: ExpertLibrary, weights: Weights = None, space: str = "factors", rank: int | None = None
) -> MergedAdapter:
    """Fold static coefficients into one adapter.

    `weights`: None (uniform 1/N), one vector (N,) for all modules, or a mapping module
    -> (N,) (layer-wise). `rank` truncates each module's delta by SVD to at most `rank`
    and records the fraction of spectral energy kept. Raises LorafuseError for a bad
    space, weights or rank.
    """
    check_space(space)
    if rank is not None and rank < 1:
        raise LorafuseError(f"--rank must be a positive integer; got {rank}")
    per_module = resolve_weights(library, weights)
    if weights is not None:
        _warn_about_weights(per_module, space)
    modules, energy = {}, {} if rank is not None else None
    capped = []
    for name, mod in library.modules.items():
        A, B = mod.fold(per_module[name], space)  # (M, D), (O, M)
        if rank is not None:
            if rank >= A.shape[0]:
                capped.append((name, A.shape[0]))
            B, A, kept = truncate_product(B, A, rank)
            energy[name] = kept
        modules[name] = (A, B)
    if capped:
        ranks = sorted({m for _, m in capped})
        warnings.warn(
            f"--rank {rank} is at or above the exact rank of {len(capped)} of "
            f"{len(library.modules)} modules (their merged deltas have rank at most "
            f"{', '.join(map(str, ranks))}, e.g. {capped[0][0]}); those modules are exported "
            "exactly, at their own rank",
            LorafuseWarning,
            stacklevel=2,
        )
    first = next(iter(library.modules.values()))
    tasks = merged_tasks(library, per_module)
    meta = {
        "merged_from": library.names,
        "space": space,
        "rank": rank,
        "weights": (
            next(iter(per_module.values())).tolist()
            if not isinstance(weights, Mapping)
            else {m: w.tolist() for m, w in per_module.items()}
        ),
        "tasks": tasks,
    }
    return MergedAdapter(
        modules, space, first.fan_in_fan_out, library.base_model, energy=energy, meta=meta
    )


def save_adapter(merged: MergedAdapter, out: str | Path, force: bool = False) -> Path:
    """Write `merged` as a PEFT adapter folder (loads with PeftModel.from_pretrained).

    Modules of lower rank are zero-padded to the adapter's rank (exact). The folder is
    written under a temporary name and renamed; raises OutputExistsError if `out`
    exists and not `force`.
    """
    from safetensors.torch import save_file

    r = merged.rank
    tensors: dict[str, Tensor] = {}
    for name, (A, B) in merged.modules.items():
        Ap = torch.zeros(r, A.shape[1])
        Ap[: A.shape[0]] = A
        Bp = torch.zeros(B.shape[0], r)
        Bp[:, : B.shape[1]] = B
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = Ap.contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = Bp.contiguous()
    cfg = adapter_config(r, list(merged.modules), merged.base_model, merged.fan_in_fan_out)
    with atomic_dir(out, force) as tmp:
        save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        cfg.save_pretrained(str(tmp))
        (tmp / METADATA_NAME).write_text(json.dumps(merged.meta, indent=2) + "\n")
    return Path(out)


def merged_state_dict(model: nn.Module, merged: MergedAdapter) -> dict[str, Tensor]:
    """The model's state dict with each module's weight replaced by W + delta.

    The delta is B @ A, transposed for Conv1D (weights stored (D, O)); computed in fp32
    and cast back to the weight's dtype. Raises LorafuseError for a missing module, or a
    quantized model (merging into it would dequantize it silently).
    """
    from lorafuse.model import refuse_quantized

    refuse_quantized(model)
    sd = dict(model.state_dict())
    for name, (A, B) in merged.modules.items():
        key = f"{name}.weight"
        if key not in sd:
            raise LorafuseError(f"the model has no module {name} to merge into")
        W = sd[key]
        base = model.get_submodule(name)
        dW = B.to(W.device) @ A.to(W.device)  # (O, D)
        if base_shape(base) != (dW.shape[1], dW.shape[0]):
            raise LorafuseError(
                f"module {name}: merged delta is (out={dW.shape[0]}, in={dW.shape[1]}) but the "
                f"model's layer is (in, out)={base_shape(base)}"
            )
        if type(base).__name__ == "Conv1D":
            dW = dW.T  # (D, O)
        sd[key] = (W.float() + dW).to(W.dtype)
    return sd


def save_merged_model(
    model: nn.Module,
    merged: MergedAdapter,
    out: str | Path,
    tokenizer: Any = None,
    force: bool = False,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Save a full transformers model with `merged` folded into its weights.

    `state_dict`: `merged_state_dict(model, merged)` if the caller computed it already.
    """
    sd = merged_state_dict(model, merged) if state_dict is None else state_dict
    with atomic_dir(out, force) as tmp:
        model.save_pretrained(str(tmp), state_dict=sd)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / METADATA_NAME).write_text(json.dumps(merged.meta, indent=2) + "\n")
    return Path(out)
