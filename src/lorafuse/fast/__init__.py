"""lorafuse.fast: the fused layer's speed-ups as plans, chosen once per layer.

lorafuse.layer holds the reference forward (the formula); this package holds the plans
that make it fast and equal it by test (tests/fast):
- plans.py      Joint, Chosen and Folded (inference), Trained (autograd): straight forwards
- rows.py       JointRows: one buffer [W ; A ; P], so one GEMM reads x once
- functions.py  autograd Functions with hand-written backward passes (Project, Mix, Routed)
- gemm.py       oneDNN products on CPUs where MKL is slow (LORAFUSE_ONEDNN)
- kernels.py    compiled C for a softmax router's elementwise work (LORAFUSE_CPU_KERNELS)

`choose(layer)` is the planner lorafuse.model.attach gives every fused layer; the layer
calls it when its mixer is set, on `replan()` and after a move. It reads the three
switches then (never per call) and returns (training plan, inference plan, why):
- LORAFUSE_FAST=0: no plans; the layer runs its reference forward.
- inference: fixed coefficients (lorafuse.mixers.static.Fixed, Uniform) that are global,
  or per sequence with at most N/2 experts per row: `Folded`; a projected mixer keeping
  its top k of N >= 4k experts, when N*R*(D+O) >= CHOSEN_WORK: `Chosen` (few tokens) over
  `Joint`; any other mixer: `Joint`.
- training: `Trained`; with a dense softmax router (lorafuse.mixers.protocol), a base
  whose output is exactly F.linear (lorafuse.base_layers.joins_gemm) and frozen, the
  whole layer is one autograd Function.
The rule is justified by bench/fused_layer.py and bench/routing.py on the CPUs measured
(README, "Speed"): every plan at least as fast as the reference there.
"""

from __future__ import annotations

import os

from torch import Tensor, nn

from lorafuse.base_layers import joins_gemm
from lorafuse.fast import gemm, kernels
from lorafuse.fast.plans import Chosen, Folded, Joint, Trained
from lorafuse.fast.rows import joint_rows
from lorafuse.mixers.protocol import ProjectedMixer, SoftmaxRouter
from lorafuse.mixers.routers import ArrowRouter, LinearRouter
from lorafuse.mixers.static import Fixed

SWITCH = "LORAFUSE_FAST"  # "0": fused layers run the reference (read when plans are chosen)

__all__ = ["SWITCH", "Chosen", "Folded", "Joint", "Trained", "choose", "describe"]
CHOSEN_WORK = 2**20  # N*R*(D+O) from which reading only the chosen experts pays
# The mixers whose `top_k` = k guarantees at most k nonzero coefficients per token (a
# mixer of another kind may name a `top_k` that means something else: it gets Joint).
TOP_K_ROUTERS = (ArrowRouter, LinearRouter)


def choose(layer: nn.Module) -> tuple:
    """(training plan, inference plan, why) for a fused layer and its mixer (rule above)."""
    if os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return None, None, f"reference: {SWITCH}=0"
    mixer, base = layer.mixer, layer.base
    device, dtype = layer.A_rows.device, layer.A_rows.dtype
    ops = gemm.products() if device.type == "cpu" else gemm.TORCH
    plain = joins_gemm(base) and base.weight.dtype == dtype and base.weight.device == device
    rows = joint_rows(layer, plain)
    proj = _projection(mixer, rows)
    rbias = _softmax_bias(mixer, proj, layer.num_experts, device, dtype)
    kern = kernels.for_plan(device, dtype) if rbias is not None else None
    frozen = not any(p.requires_grad for p in base.parameters())
    fixed = _few_experts(mixer, layer.num_experts)
    if fixed is not None:
        inference = Folded(layer, fixed, ops, plain)
    else:
        inference = Joint(layer, rows, ops, proj, rbias, kern)
        k = _chosen_k(mixer, proj, layer)
        if k is not None:
            inference = Chosen(layer, inference, proj, k)
    train = Trained(layer, rows, ops, proj, rbias, kern, frozen)
    why = (
        f"{'base joined' if rows.top else 'base apart'}, "
        f"{'projected mixer' if proj is not None else 'mixer on x'}"
        f"{', dense softmax router' if rbias is not None else ''}"
        f"{', compiled kernels' if kern is not None else ''}, {ops!r} products"
    )
    return train, inference, why


def describe(layer: nn.Module) -> str:
    """One line: the layer's training and inference plans and why they were chosen."""
    names = [getattr(p, "kind", "reference") if p is not None else "reference"
             for p in (layer.train_plan, layer.inference_plan)]  # fmt: skip
    return f"train {names[0]}, inference {names[1]} ({layer.why})"


def _projection(mixer, rows) -> Tensor | None:
    # The mixer's linear map (P, D) when it is a ProjectedMixer whose map fits the buffer.
    if not isinstance(mixer, ProjectedMixer):
        return None
    proj = mixer.projection
    return proj if rows.fits(proj) else None


def _softmax_bias(mixer, proj, N: int, device, dtype) -> Tensor | None:
    # A dense softmax router's bias b (N,), where its map and bias fit; else None.
    if proj is None or proj.shape[0] != N or not isinstance(mixer, SoftmaxRouter):
        return None
    b = mixer.softmax_bias
    fits = b is not None and b.shape == (N,) and b.dtype == dtype and b.device == device
    return b if fits else None


def _chosen_k(mixer, proj, layer) -> int | None:
    # K of a top-k projected mixer whose experts are many enough that reading only the
    # chosen ones pays (N >= 4K and N*R*(D+O) >= CHOSEN_WORK); else None.
    if proj is None or not isinstance(mixer, TOP_K_ROUTERS):
        return None
    k, N = mixer.top_k, layer.num_experts
    if k is None or 4 * k > N:
        return None
    D, O = layer.A_rows.shape[1], layer.out_features
    return k if N * layer.rank * (D + O) >= CHOSEN_WORK else None


def _few_experts(mixer, N: int) -> Tensor | None:
    # Fixed coefficients, global or (B, N) with at most N/2 experts in every row; else None.
    if not isinstance(mixer, Fixed) or mixer.coefficients.shape[-1] != N:
        return None  # (other coefficients fail in the forward, with the reference's error)
    c = mixer.coefficients
    if c.dim() == 1:
        return c
    if c.dim() == 2 and 2 * int((c != 0).sum(-1).max()) <= N:
        return c
    return None
