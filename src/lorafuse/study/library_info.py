"""What a study records of its library (results.json's `library`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafuse.errors import LorafuseError
from lorafuse.formats.manifest import read_manifest


def library_info(ws, cfg) -> dict[str, Any]:
    """results.json's `library`: the base model, preset, tasks, each kind's experts, the
    families and (for a benchmark build) its structure statistics and training budgets."""
    kinds = {}
    for kind in ws.kinds:
        try:
            kinds[kind] = ws.library(kind).names
        except LorafuseError as e:
            kinds[kind] = f"error: {e}"
    families, structure, preset = None, None, None
    manifest = Path(ws.spec.root) / "manifest.json"
    if manifest.is_file():
        m = read_manifest(manifest)
        families = {f["name"]: f["tasks"] for f in m.get("families", [])} or None
        preset = m.get("preset")
        structure = build_structure(m)
    return {
        "base_model": ws.spec.base_model,
        "preset": preset,
        "tasks": ws.tasks,
        "experts": kinds,
        "families": families,
        "structure": structure,
        "device": str(ws.device),
        "dtype": str(ws.dtype).replace("torch.", ""),
        "seed": cfg.seed,
    }


def build_structure(manifest: dict) -> dict | None:
    """The build's structure statistics (benchmark.structure), each kind's off-task ratio
    and each kind's training budget, from its manifest."""
    from lorafuse.benchmark.build import training_budget

    stages = manifest.get("stages", {})
    if not stages.get("structure"):
        return None
    out = {**stages["structure"]}
    out["kinds"] = {**out.get("kinds", {}), **stages.get("offtask", {}).get("kinds", {})}
    out["training"] = training_budget(manifest)
    return out
