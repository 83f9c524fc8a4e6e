"""The shared training loop: it learns, resumes exactly, and shards under accelerate."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from lorafuse.errors import LorafuseError
from lorafuse.fit.options import GridOptions, LoopOptions
from lorafuse.fit.schedule import lr_factor, warmup_cosine, warmup_steps
from lorafuse.fit.sgd import SGDResult, SGDSettings, epoch_order, search_lr, train
from tests.fit.sgd_script import run

ROOT = Path(__file__).resolve().parents[2]


def test_learns_and_keeps_best():
    res, w = run(SGDSettings(lr=0.3, epochs=8, batch_size=8))
    assert res.history[-1]["validation"] < 0.1 < res.history[0]["train"]
    torch.testing.assert_close(w, torch.tensor([1.0, -2.0, 0.5]), atol=0.15, rtol=0)
    assert res.best_val == min(h["validation"] for h in res.history)


def test_schedule_and_order():
    w = warmup_steps(0.1, 100)
    assert w == 10
    f = [lr_factor(s, 100, w) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # cosine decays monotonically
    assert f[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    flat = [lr_factor(s, 100, w, decay=False) for s in range(100)]
    assert flat[:10] == f[:10] and flat[10:] == [1.0] * 90  # until a plateau: constant
    # the benchmark's trainers: warm-up in steps, cosine to a floor of 0.1
    g = warmup_cosine(4, 20)
    assert g(0) == pytest.approx(0.25) and g(3) == 1.0 and g(20) == pytest.approx(0.1)
    assert g(12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))


def test_training_until_a_plateau_keeps_the_rate_constant():
    # epochs None: after the warm-up every step uses the full rate (AdamW's first step
    # moves each parameter by about lr, whatever the gradient's size).
    rates = []
    params = {"w": nn.Parameter(torch.zeros(1))}

    def loss_fn(idx):
        return ((params["w"] - 100.0) ** 2).sum()

    settings = SGDSettings(lr=0.1, epochs=None, max_steps=20, batch_size=1, warmup=0.1)
    train(
        params, loss_fn, 4, settings, progress=lambda step, loss: rates.append(params["w"].item())
    )
    steps = [b - a for a, b in zip([0.0, *rates], rates)]
    assert steps[1] == pytest.approx(0.1, rel=1e-3)  # warm-up over 2 steps: 0.05, then 0.1
    assert all(d == pytest.approx(0.1, rel=1e-2) for d in steps[2:])
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
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(two), "1"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    one, two = torch.load(one), torch.load(two)
    assert (one["processes"], two["processes"]) == (1, 2)  # two real processes ran
    assert one["stop"] == two["stop"] == "plateau" and int(one["steps"]) < 200
    assert int(two["steps"]) == int(one["steps"])
    torch.testing.assert_close(two["w"], one["w"], atol=1e-5, rtol=0)


def _counter(values):
    """validate() returning `values` one after another (the last one forever)."""
    calls = []

    def validate():
        calls.append(1)
        return values[min(len(calls), len(values)) - 1]

    return validate


def _plateau_by_hand(vals, patience, min_delta):
    """Index of the validation where the plateau rule stops (None: never), by hand."""
    ref, bad = None, 0
    for i, v in enumerate(vals):
        if ref is None or v < ref * (1 - min_delta):
            ref, bad = v, 0
        else:
            bad += 1
        if bad >= patience:
            return i
    return None


def test_stops_when_the_validation_loss_plateaus():
    # The least-squares loss flattens at the noise floor (~0.01): a plateau, long before
    # the cap.
    s = SGDSettings(lr=0.3, epochs=None, batch_size=8, eval_every=4, patience=3,
                    min_delta=0.01, max_steps=2000)  # fmt: skip
    res, _ = run(s)
    vals = [h["validation"] for h in res.history]
    assert res.stop == "plateau" and res.converged
    assert res.steps < 2000 and res.steps == 4 * len(vals)
    assert _plateau_by_hand(vals, 3, 0.01) == len(vals) - 1  # stopped at the first plateau
    assert res.best_val == min(vals) and res.final_val == vals[-1]
    assert res.best_step == 4 * (vals.index(min(vals)) + 1)
    summary = res.summary()
    assert summary["converged"] is True and summary["steps"] == res.steps
    assert summary["validation_loss"] == res.best_val
    assert summary["final_validation_loss"] == vals[-1]


def test_improvements_below_min_delta_count_as_a_plateau_but_keep_the_best():
    vals = [1.0, 0.9995, 0.999, 0.5]  # two tiny improvements (< 0.1%), then a big one
    s = SGDSettings(lr=0.05, epochs=None, batch_size=8, eval_every=2, patience=2,
                    min_delta=1e-3, max_steps=100)  # fmt: skip
    res, _ = run(s, validate=_counter(vals))
    assert res.stop == "plateau" and res.steps == 6  # the third validation stops it
    assert res.best_val == 0.999 and res.best_step == 6  # the lowest loss seen is kept
    loose = SGDSettings(**{**vars(s), "min_delta": 0.0})
    res, _ = run(loose, validate=_counter(vals))
    # Every improvement counts: the plateau is the two validations after the 0.5.
    assert (res.best_val, res.best_step, res.steps, res.stop) == (0.5, 8, 12, "plateau")


@pytest.mark.parametrize(
    ("epochs", "max_steps", "stop", "steps"),
    [(None, 40, "step cap", 40), (3, None, "epochs", 24), (3, 20, "step cap", 20),
     (2, 1000, "epochs", 16)],
)  # fmt: skip
def test_a_run_still_improving_at_its_budget_is_not_converged(epochs, max_steps, stop, steps):
    strictly_down = [1.0 / (1 + i) for i in range(1000)]  # 64 examples / 8 = 8 steps/epoch
    s = SGDSettings(lr=0.05, epochs=epochs, batch_size=8, eval_every=2, patience=2,
                    max_steps=max_steps)  # fmt: skip
    res, _ = run(s, validate=_counter(strictly_down))
    assert (res.stop, res.steps, res.converged) == (stop, steps, False)
    assert res.final_val == res.best_val == strictly_down[len(res.history) - 1]
    assert res.best_step == steps


def test_without_validation_the_stop_says_so():
    res, _ = run(SGDSettings(lr=0.05, epochs=1, batch_size=8, patience=2), validate=False)
    assert (res.stop, res.converged, res.steps, res.best_val) == ("no validation", False, 8, None)


def test_resume_keeps_the_early_stop(tmp_path):
    s = SGDSettings(lr=0.3, epochs=None, batch_size=8, eval_every=4, patience=3,
                    min_delta=0.01, max_steps=2000)  # fmt: skip
    whole, uninterrupted = run(s)
    assert whole.stop == "plateau" and whole.steps > 12

    def stop_at_10(step, loss):
        if step == 10:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        run(s, checkpoint=ckpt, progress=stop_at_10)
    res, resumed = run(s, checkpoint=ckpt)
    assert res.summary() == whole.summary() and res.history == whole.history
    torch.testing.assert_close(resumed, uninterrupted, atol=1e-6, rtol=0)
    # The stopped run's checkpoint resumes to the same stop without another step.
    steps = []
    again, weights = run(s, checkpoint=ckpt, progress=lambda step, loss: steps.append(step))
    assert steps == [] and again.summary() == whole.summary()
    torch.testing.assert_close(weights, uninterrupted, atol=1e-6, rtol=0)


def test_settings_validation_and_options():
    with pytest.raises(LorafuseError, match="needs max_steps"):
        SGDSettings(epochs=None)
    for bad in ({"patience": 0}, {"eval_every": 0}, {"min_delta": -0.1}, {"epochs": "5"},
                {"max_steps": 0}, {"lr": 0.0}, {"warmup": 1.5}):  # fmt: skip
        with pytest.raises(LorafuseError, match=next(iter(bad))):
            SGDSettings(**bad)
    opts = {"epochs": None, "max_steps": 50, "patience": 2, "eval_every": 5, "min_delta": 0.01,
            "warmup": 0.1, "batch_size": 4, "seed": 3}  # fmt: skip
    s = LoopOptions(**opts).settings(0.1)
    assert (s.epochs, s.max_steps, s.patience, s.eval_every) == (None, 50, 2, 5)
    assert (s.min_delta, s.warmup, s.batch_size, s.seed, s.lr) == (0.01, 0.1, 4, 3, 0.1)
    assert vars(LoopOptions().settings(0.1)) == vars(SGDSettings(lr=0.1))  # the same defaults
    assert GridOptions(lr=0.5).grid() == [0.5] and GridOptions(lr_grid=[1, 2]).grid() == [1.0, 2.0]
    assert GridOptions().grid() == [1e-3, 1e-4, 1e-5]
    with pytest.raises(ValidationError, match="max_step"):
        LoopOptions(max_step=10)  # a typo is an error, not ignored
    with pytest.raises(ValidationError, match="patience"):
        LoopOptions(patience="soon")


def test_search_lr_keeps_the_lowest_validation_loss():
    losses = {0.1: 0.5, 0.01: 0.2, 0.001: None}

    def run(lr):
        return SGDResult({}, losses[lr], steps=3)

    lr, res, runs = search_lr([0.1, 0.01, 0.001], run)
    best = min((v, k) for k, v in losses.items() if v is not None)[1]
    assert lr == best and res.best_val == losses[best]
    assert [r["lr"] for r in runs] == [0.1, 0.01, 0.001]
    lr, _, _ = search_lr([0.001], run)  # no validation at all: the first rate
    assert lr == 0.001


@pytest.mark.parametrize(
    "payload, said",
    [
        ([1, 2], "not a lorafuse fit checkpoint"),
        ({"params": {"w": torch.zeros(3)}}, "not a lorafuse fit checkpoint"),
        ({"params": [1], "optimizer": {}, "state": {}, "best": None}, "other parameters"),
    ],
)
def test_a_foreign_checkpoint_is_refused_by_name(tmp_path, payload, said):
    ckpt = tmp_path / "ckpt.pt"
    torch.save(payload, ckpt)
    with pytest.raises(LorafuseError, match=said) as info:
        run(SGDSettings(lr=0.05, epochs=1, batch_size=8), checkpoint=ckpt)
    assert str(ckpt) in str(info.value) and "delete it" in str(info.value)


def _least_squares64():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 3, generator=g, dtype=torch.float64)
    return X, X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def _adamw_by_hand(X, y, rows, steps, s: SGDSettings):
    """AdamW (decoupled weight decay, bias-corrected moments), the warm-up and cosine to a
    floor, and the norm clip, written out on the full batch's closed-form gradient."""
    b1, b2 = s.betas
    w, m, v = (torch.zeros(3, dtype=torch.float64) for _ in range(3))
    norms = []
    for t in range(steps):
        Xb, yb = X[rows(t)], y[rows(t)]
        g = 2 * Xb.T @ (Xb @ w - yb) / len(yb)  # d/dw of the batch's mean squared error
        norms.append(float(g.norm()))
        g = g * min(1.0, s.max_grad_norm / (norms[-1] + 1e-6))
        if t < s.warmup_steps:
            lr = s.lr * (t + 1) / s.warmup_steps
        else:
            done = (t - s.warmup_steps) / (steps - s.warmup_steps)
            lr = s.lr * (s.floor + (1 - s.floor) * 0.5 * (1 + math.cos(math.pi * done)))
        w = w * (1 - lr * s.weight_decay)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1 ** (t + 1))) / ((v / (1 - b2 ** (t + 1))).sqrt() + 1e-8)
    return w, norms


def test_accumulation_clipping_and_the_schedule_equal_adamw_by_hand():
    # Batches in order from a hook, 4 micro-batches per step: the loop's weights are those
    # of AdamW on each whole batch's gradient, computed by hand.
    X, y = _least_squares64()
    s = SGDSettings(lr=0.05, epochs=None, max_steps=12, batch_size=8, grad_accum=4,
                    warmup_steps=3, floor=0.1, decay=True, weight_decay=0.01,
                    betas=(0.8, 0.95), max_grad_norm=0.5)  # fmt: skip

    def rows(step):
        return [(step * 8 + i) % 64 for i in range(8)]

    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    seen = []

    def loss_fn(idx):
        seen.append(list(idx))
        return ((X[idx] @ w - y[idx]) ** 2).mean()

    res = train({"w": w}, loss_fn, 64, s, batches=rows)
    expected, norms = _adamw_by_hand(X, y, rows, 12, s)
    assert norms[0] > 0.5  # the clip acted
    assert (res.steps, res.stop) == (12, "no validation")
    assert seen[:4] == [rows(0)[i : i + 2] for i in (0, 2, 4, 6)]  # the micro-batches
    assert [i for part in seen[4:8] for i in part] == rows(1)
    torch.testing.assert_close(w.detach(), expected, atol=1e-12, rtol=0)
    one = nn.Parameter(torch.zeros(3, dtype=torch.float64))  # one micro-batch per step
    train({"w": one}, lambda idx: ((X[idx] @ one - y[idx]) ** 2).mean(), 64,
          SGDSettings(**{**vars(s), "grad_accum": 1}), batches=rows)  # fmt: skip
    torch.testing.assert_close(one.detach(), w.detach(), atol=1e-12, rtol=0)


def test_resume_with_a_batches_hook_and_the_benchmark_schedule(tmp_path):
    # A pure batches hook (as the benchmark's samplers are) resumes to the same weights.
    X, y = _least_squares64()
    s = SGDSettings(lr=0.05, epochs=None, max_steps=12, batch_size=8, eval_every=3,
                    warmup_steps=2, floor=0.1, decay=True, max_grad_norm=1.0)  # fmt: skip

    def rows(step):
        return epoch_order(64, 5, step // 8)[(step % 8) * 8 : (step % 8 + 1) * 8][::-1]

    def fit(checkpoint=None, progress=None):
        w = nn.Parameter(torch.zeros(3, dtype=torch.float64))

        def val():
            with torch.no_grad():
                return float(((X @ w - y) ** 2).mean())

        def loss(idx):
            return ((X[idx] @ w - y[idx]) ** 2).mean()

        res = train({"w": w}, loss, 64, s, val, checkpoint, progress, batches=rows)
        return res, w.detach().clone()

    whole, uninterrupted = fit()

    def stop_at_7(step, loss):
        if step == 7:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(ckpt, stop_at_7)
    taken = []
    res, resumed = fit(ckpt, lambda step, loss: taken.append(step))
    assert taken == list(range(7, 13))  # from the checkpoint of step 6
    assert res.history == whole.history
    torch.testing.assert_close(resumed, uninterrupted, atol=0, rtol=0)
