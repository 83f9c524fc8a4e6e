"""Every plan against the reference forward, in ONE run: is each plan worth choosing?

lorafuse.fast.choose gives a fused layer a plan per mixer kind (inference: Joint or
Folded; autograd: Trained, one Function for a dense softmax router). This script times,
for each mixer kind, the plan the rule picks against the same layer's reference forward
(no planner), interleaved round by round, and prints the median of the per-round ratios
reference time / plan time (> 1: the plan is faster), with the plan's name and why.

    python bench/plans.py                      # Phi-2 width: D=O=2560, N=10, R=4
    python bench/plans.py --small              # the benchmark's small: D=256, O=128, N=32
    python bench/plans.py --sequences 4 --tokens 1   # decoding: one new token per sequence

Products follow LORAFUSE_ONEDNN as the library does (read when the plans are chosen);
the reference always multiplies with torch's own products.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn


def cases(N: int, D: int, B: int, T: int, g: torch.Generator) -> dict:
    """Mixer factories by name, and whether the case trains (forward + backward)."""
    from lorafuse.mixers import Fixed, Learned
    from lorafuse.mixers.routers import ArrowRouter, LinearRouter

    protos = nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)  # (N, D)
    one_hot = torch.eye(N)[torch.randint(0, N, (B,), generator=g)]  # (B, N)

    def router(**kw):
        r = LinearRouter(D, N, init=protos, **kw)
        with torch.no_grad():
            r.bias.normal_(generator=g)
        return r

    return {
        "merge, global coefficients": (lambda: Fixed(torch.softmax(torch.randn(N), -1)), False),
        "one expert per sequence": (lambda: Fixed(one_hot), False),
        "per-token fixed coefficients": (
            lambda: Fixed(torch.softmax(torch.randn(B, T, N, generator=g), -1)),
            False,
        ),
        "dense router": (lambda: router(), False),
        "Arrow top-4": (lambda: ArrowRouter(protos, min(4, N), 1.0), False),
        "train dense router": (lambda: router(), True),
        "train top-4 router": (lambda: router(top_k=min(4, N)), True),
        "train learned merge": (lambda: Learned(N), True),
    }


def timed(layer, x: torch.Tensor, train: bool, inner: int) -> float:
    """Seconds per call: a forward (inference mode), or a forward and backward."""
    t0 = time.perf_counter()
    for _ in range(inner):
        if train:
            layer(x).sum().backward()
        else:
            with torch.inference_mode():
                layer(x)
    return (time.perf_counter() - t0) / inner


def main() -> None:
    from lorafuse.factors import StackedModule
    from lorafuse.fast import choose, describe
    from lorafuse.layer import FusedLoRALinear

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="D=256, O=128, N=32, R=4")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    p.add_argument("--space", default="factors", choices=["factors", "deltas"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--inner", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    D, O, N, R = (256, 128, 32, 4) if args.small else (2560, 2560, 10, 4)
    B, T = args.sequences, args.tokens
    stacked = StackedModule(
        A=torch.randn(N, R, D, generator=g) / D**0.5,
        B=torch.randn(N, O, R, generator=g) / R**0.5,
        scale=torch.full((N,), 4.0),
        rank=torch.full((N,), R),
    )
    linear = nn.Linear(D, O).requires_grad_(False)
    x = torch.randn(B, T, D, generator=g)  # (B, T, D)
    print(
        f"one layer D={D}, O={O}, N={N}, R={R}, {B} sequences x {T} tokens, {args.space}, "
        f"fp32, {args.threads} threads, torch {torch.__version__}; median of {args.rounds} "
        f"interleaved rounds x {args.inner} calls"
    )
    from lorafuse.fast import gemm

    print(f"cpu: {gemm.cpu_line()}; oneDNN products in the plans: {gemm.enabled()}")
    print(f"{'mixer':<30}{'plan ms':>9}{'ref ms':>9}{'ref/plan':>10}  plan (why)")
    for name, (make, train) in cases(N, D, B, T, g).items():
        mixer = make()
        plan = FusedLoRALinear(copy.deepcopy(linear), stacked, args.space, planner=choose)
        ref = FusedLoRALinear(copy.deepcopy(linear), stacked, args.space)  # no planner
        plan.mixer = ref.mixer = mixer
        xi = x.clone().requires_grad_(train)
        with torch.no_grad():  # the plan computes what the reference does
            err = (plan(xi) - ref(xi)).abs().max().item()
        if err > 1e-3:
            raise SystemExit(f"{name}: the plan differs from the reference by {err}")
        timed(plan, xi, train, 1), timed(ref, xi, train, 1)  # warm-up
        tp, tr = [], []
        for r in range(args.rounds):
            pair = [(plan, tp), (ref, tr)][:: 1 if r % 2 else -1]
            for layer, out in pair:
                out.append(timed(layer, xi, train, args.inner))
        ratio = statistics.median(b / a for a, b in zip(tp, tr))
        line = describe(plan)
        print(
            f"{name:<30}{statistics.median(tp) * 1e3:>9.2f}{statistics.median(tr) * 1e3:>9.2f}"
            f"{ratio:>10.2f}  {line}"
        )


if __name__ == "__main__":
    main()
