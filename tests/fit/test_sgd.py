"""The shared training loop: it learns, resumes exactly, and shards under accelerate."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorafuse.errors import LorafuseError
from lorafuse.fit.sgd import SGDSettings, epoch_order, schedule
from tests.fit.sgd_script import run

ROOT = Path(__file__).resolve().parents[2]


def test_learns_and_keeps_best():
    res, w = run(SGDSettings(lr=0.3, epochs=8, batch_size=8))
    assert res.history[-1]["validation"] < 0.1 < res.history[0]["train"]
    torch.testing.assert_close(w, torch.tensor([1.0, -2.0, 0.5]), atol=0.15, rtol=0)
    assert res.best_val == min(h["validation"] for h in res.history)


def test_schedule_and_order():
    f = [schedule(s, 100, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # cosine decays monotonically
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1) != epoch_order(10, 0, 2)
    with pytest.raises(LorafuseError, match="multiple of grad_accum"):
        SGDSettings(batch_size=10, grad_accum=3)


def test_resume_gives_the_same_weights(tmp_path):
    settings = SGDSettings(lr=0.05, epochs=3, batch_size=8, eval_every=4)
    _, uninterrupted = run(settings)

    def stop_at_10(step, loss):
        if step == 10:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        run(settings, checkpoint=ckpt, progress=stop_at_10)
    assert ckpt.exists()  # saved at step 8
    res, resumed = run(settings, checkpoint=ckpt)
    assert res.steps == 24
    torch.testing.assert_close(resumed, uninterrupted, atol=1e-6, rtol=0)


def test_accelerate_two_processes_equal_one(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate launcher not installed")
    script = ROOT / "tests/fit/sgd_script.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one.pt"
    subprocess.run([sys.executable, script, one, "1"], check=True, env=env, cwd=ROOT)
    two = tmp_path / "two.pt"
    cmd = [accelerate, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(two), "1"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    torch.testing.assert_close(torch.load(two), torch.load(one), atol=1e-5, rtol=0)
