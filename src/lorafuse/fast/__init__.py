"""lorafuse.fast: the fused layer's speed-ups, behind one object chosen once per layer.

lorafuse.layer holds the reference forward (the formula); this package holds everything
that makes it fast and equals it by test (tests/fast):
- joint.py      JointPath: one GEMM for the base, the experts and a router; in-place
                accumulation; the per-call choice among the paths below
- functions.py  autograd Functions with hand-written backward passes (Project, Mix, Routed)
- sparse.py     gather each sequence's few experts (row-sparse coefficients)
- gemm.py       oneDNN products on CPUs where MKL is slow (LORAFUSE_ONEDNN)
- kernels.py    compiled C for a softmax router's elementwise work (LORAFUSE_CPU_KERNELS)

The rule, in one place (`choose`, called once when a FusedLoRALinear is built):
- LORAFUSE_FAST=0 (read then): no fast path; the layer runs its reference forward.
- Otherwise a JointPath, on every device and dtype. For a base whose output is exactly
  F.linear(x, W, b) (lorafuse.base_layers.joins_gemm: an nn.Linear with a full floating
  weight and nn.Linear's forward) its weight and bias join the joint GEMM (as views of
  its buffer); any other base (a transformers Conv1D, weight stored (D, O); a quantized
  or custom Linear) keeps its own product, and only the experts' and a router's rows
  share one.
Per call, the JointPath declines (returns None, and the reference runs) under autocast
and when x's dtype is not the layer's. Everything else it decides per call
from the mixer (lorafuse.mixers.protocol), grad mode and shapes (see joint.py), and from
two switches read at each call, so that a benchmark can flip them between rounds:
LORAFUSE_ONEDNN (gemm.py, float32 CPU products) and LORAFUSE_CPU_KERNELS (kernels.py,
float32 CPU, a softmax router).

Nothing here imports lorafuse.layer: the fast path reads the layer it is given
(base, A_rows, B_cat, num_experts, rank, out_features, space, token_coefficients).
"""

from __future__ import annotations

import os

from torch import nn

from lorafuse.base_layers import joins_gemm
from lorafuse.fast.joint import JointPath

SWITCH = "LORAFUSE_FAST"  # "0": every fused layer built from now on runs the reference

__all__ = ["SWITCH", "JointPath", "choose"]


def choose(layer: nn.Module) -> JointPath | None:
    """The fast path of a newly built FusedLoRALinear, or None (the rule above)."""
    if os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    return JointPath(layer, join_base=joins_gemm(layer.base))
