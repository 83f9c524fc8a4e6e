"""Train route-sgd routers for a few steps on a benchmark folder; save them (for tests).

    python tests/methods/route_sgd_script.py <bench> <out.pt> <checkpoint dir>
Under `accelerate launch --num_processes 2` each process takes half of every batch.
"""

from __future__ import annotations

import sys

import torch

from lorafuse.methods.fused_sgd import fit_fused
from lorafuse.methods.routing import route_sgd_mixers
from lorafuse.methods.run import method_context
from lorafuse.mixers.routers import router_parameters
from lorafuse.spec import load_spec
from lorafuse.workspace import Workspace

OPTIONS = {"lr": 0.05, "epochs": 3, "batch_size": 8, "validation": False}


def run(bench, checkpoint_dir) -> dict[str, torch.Tensor]:
    """The router weights after 3 steps of 8 examples (uniform start, no validation)."""
    ws = Workspace(load_spec(bench))
    options = {**OPTIONS, "checkpoint_dir": str(checkpoint_dir)}
    _, ctx = method_context(ws, "route-sgd", "private", options)
    with fit_fused(ctx, route_sgd_mixers("uniform")) as fit:
        return {k: p.detach().clone() for k, p in router_parameters(fit.mixers).items()}


if __name__ == "__main__":
    state = run(sys.argv[1], sys.argv[3])
    from accelerate import PartialState

    if PartialState().is_main_process:
        torch.save({**state, "processes": torch.tensor(PartialState().num_processes)}, sys.argv[2])
