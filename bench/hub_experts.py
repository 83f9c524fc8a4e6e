"""Experts by hub id from a warm offline cache: loading and `info --check` at 256 experts.

Builds a hub cache in huggingface_hub's own layout (blobs, refs, symlinked snapshots)
holding N random PEFT LoRA adapters at Phi-2 width (D = 2560, MLP 10240, r = 4 on q_proj,
k_proj, v_proj, dense, fc1, fc2) over `--layers` layers, then, with HF_HUB_OFFLINE=1,
times in ONE run:

- resolve: the N ids to their cached folders (huggingface_hub's snapshot_download, offline);
- check: `check_experts(ids)` (configs and safetensors headers only, `info --check`);
- load by id: `ExpertLibrary.load(ids)` (resolve + read every tensor + stack);
- load local: `ExpertLibrary.load(folders)` on the same snapshot folders (no hub);
- cli check: `lorafuse info --check IDS...` as a subprocess (interpreter start included).

    python bench/hub_experts.py [--experts 256] [--layers 2] [--seed 0]

Each figure is the median of `--rounds` rounds; ratios are to `load local` of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.formats.test_hub import put_in_cache  # noqa: E402 - the tests' cache builder

D, F, R = 2560, 10240, 4  # Phi-2 width, MLP width, LoRA rank
SHAPES = {  # module -> (in, out)
    "self_attn.q_proj": (D, D),
    "self_attn.k_proj": (D, D),
    "self_attn.v_proj": (D, D),
    "self_attn.dense": (D, D),
    "mlp.fc1": (D, F),
    "mlp.fc2": (F, D),
}


def write_adapter(folder: Path, layers: int, g: torch.Generator) -> None:
    """A random PEFT LoRA adapter in PEFT's on-disk format."""
    folder.mkdir(parents=True)
    tensors = {}
    for layer in range(layers):
        for name, (i, o) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(R, i, generator=g) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(o, R, generator=g) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": R,
        "lora_alpha": 2 * R,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in SHAPES}),
        "base_model_name_or_path": "microsoft/phi-2",
        "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))


def timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp), Path(tmp) / "hub"
        start = time.perf_counter()
        ids = []
        for k in range(args.experts):
            src = root / "src" / f"e{k}"
            write_adapter(src, args.layers, g)
            files = {f.name: f for f in src.iterdir()}
            put_in_cache(cache, f"bench/expert-{k:04d}", files, ["main"])
            ids.append(f"bench/expert-{k:04d}")
        built = time.perf_counter() - start
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_HUB_CACHE"] = str(cache)
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = True, str(cache)
        from lorafuse.check import check_experts
        from lorafuse.library import ExpertLibrary, expert_dirs

        folders = expert_dirs(ids)[0]
        assert all(c.ok for c in check_experts(ids))
        size = sum(f.stat().st_size for f in cache.rglob("blobs/*")) / 2**20
        rows = {
            "resolve": timed(lambda: expert_dirs(ids), args.rounds),
            "check": timed(lambda: check_experts(ids), args.rounds),
            "load by id": timed(lambda: ExpertLibrary.load(ids), args.rounds),
            "load local": timed(lambda: ExpertLibrary.load(folders), args.rounds),
        }
        cli = [sys.executable, "-m", "lorafuse.cli", "info", "--check", *ids]
        if Path(sys.executable).with_name("lorafuse").exists():
            cli = [str(Path(sys.executable).with_name("lorafuse")), "info", "--check", *ids]

        def run_cli():
            out = subprocess.run(cli, capture_output=True, text=True, env=os.environ)
            assert out.returncode == 0, out.stderr[-2000:]

        rows["cli info --check"] = timed(run_cli, args.rounds)
    print(
        f"settings: {args.experts} experts x {args.layers} layers at Phi-2 width (D={D}, "
        f"MLP {F}, r={R}, 6 modules a layer), {size:.0f} MiB of safetensors in the cache "
        f"(built in {built:.1f} s), HF_HUB_OFFLINE=1, torch threads 1, median of "
        f"{args.rounds} rounds, {os.cpu_count()} CPU cores"
    )
    base = rows["load local"]
    print(f"{'step':<18} {'seconds':>9} {'ms/expert':>10} {'x load local':>13}")
    for name, t in rows.items():
        per = 1000 * t / args.experts
        print(f"{name:<18} {t:9.3f} {per:10.2f} {t / base:13.2f}")


if __name__ == "__main__":
    main()
