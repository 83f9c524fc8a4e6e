"""Decoding with a top-k router over many experts: Chosen against Joint, in ONE run.

One Phi-2-width layer (D = O = 2560, rank 4) with N random experts and a zero-shot Arrow
top-k router, inference on calls of M tokens (decoding: one token per sequence). The
layer's `Chosen` plan (each token reads only its k experts' factors) and its `Joint`
plan (one GEMM over every expert's rows) are timed interleaved, round by round, beside
the bare nn.Linear; the script first checks that both give the same output. Prints the
median microseconds per call and Joint / Chosen (> 1: reading only the chosen experts
is faster).

    python bench/chosen.py                          # N = 64, 256, 1024; M = 1, 4, 16
    python bench/chosen.py --experts 1024 --rows 64 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


def main() -> None:
    from lorafuse.factors import StackedModule
    from lorafuse.fast import choose, gemm
    from lorafuse.layer import FusedLoRALinear
    from lorafuse.mixers.routers import ArrowRouter

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16], help="tokens per call")
    p.add_argument("--dim", type=int, default=2560)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    D = O = args.dim
    R, K = 4, args.top_k
    print(f"one layer D=O={D}, R={R}, Arrow top-{K}, fp32, {args.threads} threads, torch "
          f"{torch.__version__}; median of {args.rounds} interleaved rounds x {args.inner} "
          f"calls")  # fmt: skip
    print(f"cpu: {gemm.cpu_line()}; oneDNN products in the plans: {gemm.enabled()}")
    print(
        f"{'N':>6}{'M':>6}{'Chosen us':>11}{'Joint us':>10}{'bare us':>9}{'Joint/Chosen':>14}  plan"
    )
    for N in args.experts:
        stacked = StackedModule(
            A=torch.randn(N, R, D, generator=g) / D**0.5,
            B=torch.randn(N, O, R, generator=g),
            scale=torch.full((N,), 4.0),
            rank=torch.full((N,), R),
        )
        layer = FusedLoRALinear(nn.Linear(D, O), stacked, "factors", planner=choose)
        protos = nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
        layer.mixer = ArrowRouter(protos, K, 1.0)
        chosen = layer.inference_plan
        if chosen.kind != "inference-chosen":
            print(f"{N:>6}: the rule does not choose Chosen here ({chosen.kind})")
            continue
        fns = {"chosen": chosen, "joint": chosen.joint, "bare": layer.base}
        for m in args.rows:
            x = torch.randn(1, m, D, generator=g)
            times: dict[str, list[float]] = {k: [] for k in fns}
            with torch.inference_mode():
                torch.testing.assert_close(chosen(x), chosen.joint(x), atol=1e-3, rtol=1e-3)
                for r in range(args.rounds):
                    order = list(fns) if r % 2 else list(fns)[::-1]
                    for k in order:
                        t0 = time.perf_counter()
                        for _ in range(args.inner):
                            fns[k](x)
                        times[k].append((time.perf_counter() - t0) / args.inner)
            us = {k: statistics.median(v) * 1e6 for k, v in times.items()}
            kind = "Joint (too many rows)" if m > chosen.most_rows else "Chosen"
            print(f"{N:>6}{m:>6}{us['chosen']:>11.0f}{us['joint']:>10.0f}{us['bare']:>9.0f}"
                  f"{us['joint'] / us['chosen']:>14.2f}  {kind}")  # fmt: skip


if __name__ == "__main__":
    main()
