"""Helpers shared by the tests of on-disk formats and the CLI that converts them: an mttl
library written as mttl's ExpertLibrary stores it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tests.conftest import load_base

# name -> (rank, alpha, expert_task_name, adapted layer names)
EXPERTS = {
    "task_a": (4, 16.0, "task_a", "q_proj|v_proj|down_proj"),
    "cluster_0": (2, 8.0, "task_b,task_c", "q_proj|v_proj|down_proj"),
}


def lora_modules(base_dir: Path, layers: str) -> dict[str, tuple[int, int]]:
    """{module path: (in, out)} of the base model's Linear layers named by `layers`."""
    model = load_base(base_dir)
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and re.fullmatch(layers, name.rsplit(".", 1)[-1])
    }


def write_mttl_expert(folder: Path, base_dir: Path, name: str, seed: int, **meta_changes):
    """An expert as mttl's ExpertLibrary stores it: <name>.ckpt (weights) + <name>.meta."""
    rank, alpha, tasks, layers = EXPERTS.get(name, EXPERTS["task_a"])
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for module, (d, o) in lora_modules(base_dir, layers).items():
        weights[f"{module}.lora_a"] = torch.randn(d, rank, generator=g) * 0.3  # (D, R)
        weights[f"{module}.lora_b"] = torch.randn(rank, o, generator=g) * 0.3  # (R, O)
    torch.save(weights, folder / f"{name}.ckpt")
    meta = {
        "expert_name": name,
        "expert_task_name": tasks,
        "parent_node": None,
        "expert_config": {
            "lora_rank": rank,
            "lora_alpha": alpha,
            "lora_dropout": 0.05,
            "lora_init_b_random": False,
            "modify_modules": ".*",
            "modify_layers": layers,
            "tie_params": None,
            "__model_modifier__": "lora",
        },
        "training_config": {"model": str(base_dir), "finetune_task_name": tasks, "lr": 1e-4},
        "expert_model": str(base_dir),
        "expert_deleted": False,
        **meta_changes,
    }
    torch.save(meta, folder / f"{name}.meta")
    return weights
