"""A fusion FSDP can shard: 2 CPU processes (gloo) train the routers of a sharded model
and land where one process lands on the whole batch; each rank holds half the experts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lorafuse.errors import LorafuseError
from lorafuse.library import ExpertLibrary
from lorafuse.model import attach
from tests.conftest import load_base

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "tests.fsdp_script"  # run as a module: tests/ itself must not lead sys.path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_sharded_processes_equal_one(llama_dir, llama_experts, tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [str(llama_dir), *map(str, llama_experts)]
    one = tmp_path / "one.pt"
    subprocess.run([sys.executable, "-m", SCRIPT, one, *args], check=True, env=env, cwd=ROOT)
    two = tmp_path / "two.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", SCRIPT, str(two), *args]  # fmt: skip
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = torch.load(one), torch.load(two)
    assert two["local"] * 2 == two["full"] == one["full"]  # each rank: half the experts
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]))
    assert one["losses"][1] != one["losses"][0]  # the routers did train
    assert one["routers"].keys() == two["routers"].keys()
    for name, w in one["routers"].items():  # gradients averaged across the two ranks
        torch.testing.assert_close(two["routers"][name], w, atol=1e-5, rtol=1e-4)


def test_shardable_experts_are_frozen_parameters(llama_dir, llama_experts):
    model = load_base(llama_dir)
    fusion = attach(model, ExpertLibrary.load(llama_experts), "factors", shardable=True)
    layer = next(iter(fusion.layers.values()))
    assert isinstance(layer.A_rows, nn.Parameter) and not layer.A_rows.requires_grad
    assert layer.train_plan is None and layer.inference_plan is None  # FSDP owns storage
    plain = attach(load_base(llama_dir), fusion.library, "factors")
    with pytest.raises(LorafuseError, match="shardable=True"):
        plain.shard()
    ids = torch.randint(3, 64, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain.model(ids).logits)
