"""Train a pico Llama's routers on a fused library, in one process or sharded with FSDP2
(run by tests/test_fsdp.py under torch.distributed.run): saves losses and routers."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lorafuse.library import ExpertLibrary
from lorafuse.mixers.routers import build_routers
from lorafuse.model import attach
from tests.conftest import load_base

STEPS, SEQUENCES, TOKENS = 2, 4, 8


def main(out: Path, base: Path, experts: list[Path]) -> None:
    sharded = dist.is_available() and "RANK" in __import__("os").environ
    rank, world = 0, 1
    if sharded:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    model = load_base(base)
    fusion = attach(model, ExpertLibrary.load(experts), "factors", shardable=True)
    routers = build_routers(fusion.library, "cpu", "linear", init="arrow")
    fusion.set_mixers(routers)
    layer = next(iter(fusion.layers.values()))
    full = layer.A_rows.numel()
    if sharded:
        fusion.shard()
    local = layer.A_rows.to_local().numel() if sharded else full
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (SEQUENCES, TOKENS), generator=g)  # (B, T)
    mine = ids.chunk(world)[rank]  # each rank its share of the batch
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        seen = loss.detach().clone()
        if sharded:
            dist.all_reduce(seen)
            seen /= world
        losses.append(float(seen))
    weights = {}
    for name, r in routers.items():
        for p_name, p in r.named_parameters():
            weights[f"{name}.{p_name}"] = p.full_tensor() if sharded else p.detach().clone()
    if rank == 0:
        torch.save({"losses": losses, "routers": weights, "local": local, "full": full}, out)
    if sharded:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
