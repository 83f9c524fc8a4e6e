"""One routed layer at Phi-2 size: fused layer vs PEFT's Arrow layer vs the bare Linear.

Prints, from ONE run, each variant's time relative to the bare nn.Linear (the median
over rounds of each round's ratio; variants interleaved within a round) and its peak
extra memory, next to the arithmetic floor 1 + N*R*(D+O)/(D*O). Every routed variant
computes the same per-token coefficients (top-k softmax of |x . v_i| over the same
prototypes) and the same output; the script checks they agree before timing. The fused
layers route with lorafuse's ArrowRouter, whose projection rides in the layer's GEMM.

    python bench/fused_layer.py [--tokens 2048] [--dim 2560] [--experts 10] [--rank 4]
    python bench/fused_layer.py --reference   # also the layers without their fast path
    python bench/fused_layer.py --device cuda --dtype bf16   # on a GPU (memory: CUDA's peak)

Every variant multiplies with torch's own products (MKL on CPU): the script sets
LORAFUSE_ONEDNN=0 unless it is set, so the ratios measure the layers' structure, not a
GEMM library (`LORAFUSE_ONEDNN=auto` runs the fused layers on lorafuse.fast.gemm's oneDNN
products, against the bare Linear on torch's).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

os.environ.setdefault("LORAFUSE_ONEDNN", "0")  # like for like: torch's products everywhere
VARIANTS = ["linear", "fused-factors", "fused-deltas", "peft-arrow", "per-token-matrices"]
REFERENCE = ["reference-factors", "reference-deltas"]  # --reference: layers with no plans
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(args):
    """Tensors and callables of every variant, all on the same weights and inputs."""
    from peft import ArrowConfig
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    from lorafuse.factors import StackedModule
    from lorafuse.fast import choose
    from lorafuse.layer import FusedLoRALinear
    from lorafuse.mixers.routers import ArrowRouter
    from lorafuse.mixers.topk import topk_softmax

    g = torch.Generator().manual_seed(args.seed)
    D = O = args.dim
    N, R, K, T = args.experts, args.rank, args.top_k, args.tokens
    at = {"device": torch.device(args.device), "dtype": DTYPES[args.dtype]}
    linear = nn.Linear(D, O).to(**at)
    A = (torch.randn(N, R, D, generator=g) / D**0.5).to(**at)  # (N, R, D)
    Bf = (torch.randn(N, O, R, generator=g) / R**0.5).to(**at)  # (N, O, R)
    scale = torch.full((N,), 4.0, device=at["device"])
    x = torch.randn(1, T, D, generator=g).to(**at)  # (B, T, D)
    protos = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1).to(**at)

    def router(inp):  # same Arrow rule as PEFT: top-k softmax of |x . v_i|
        return topk_softmax((inp @ protos.T).abs(), K, 1.0)  # (B, T, N)

    stacked = StackedModule(A=A, B=Bf, scale=scale, rank=torch.full((N,), R))
    fused = {}
    for space in ("factors", "deltas"):  # each its own copy: the layer takes W's storage
        layer = FusedLoRALinear(copy.deepcopy(linear), stacked, space, "bench", planner=choose)
        fused[space] = layer  # plans chosen as lorafuse.model.attach does
        fused[space].mixer = ArrowRouter(protos, K, 1.0)  # the same rule as `router`
        if args.reference:
            ref = FusedLoRALinear(copy.deepcopy(linear), stacked, space, "bench")  # no plans
            ref.mixer = ArrowRouter(protos, K, 1.0)
            fused[f"reference-{space}"] = ref

    names = [f"task_{i}" for i in range(N)]
    cfg = ArrowConfig(top_k=K, router_temperature=1.0)
    cfg.task_adapter_names = names
    arrow = ArrowLoraLinearLayer(D, cfg)
    lora_A = nn.ModuleDict({n: nn.Linear(D, R, bias=False) for n in names})
    lora_B = nn.ModuleDict({n: nn.Linear(R, O, bias=False) for n in names})
    with torch.no_grad():
        for i, n in enumerate(names):
            lora_A[n].weight.copy_(A[i])
            lora_B[n].weight.copy_(Bf[i])
    arrow.register_buffer("prototypes", protos.clone(), persistent=False)
    arrow._protos_ready = True
    arrow.to(**at)
    lora_A.to(**at)
    lora_B.to(**at)
    scaling = {n: float(scale[i]) for i, n in enumerate(names)}

    def per_token_matrices(inp):  # mttl's way: per-token mixed A and B materialised
        l = router(inp)[0]  # (T, N)
        At = torch.einsum("tn,nrd->trd", l, A)  # (T, R, D)
        Bt = torch.einsum("tn,nor->tor", l * scale.to(l.dtype), Bf)  # (T, O, R)
        h = torch.einsum("trd,td->tr", At, inp[0])  # (T, R)
        return linear(inp) + torch.einsum("tor,tr->to", Bt, h)[None]

    return {
        "x": x,
        "linear": linear,
        "fused-factors": fused["factors"],
        "fused-deltas": fused["deltas"],
        "peft-arrow": lambda inp: linear(inp) + arrow(inp, lora_A, lora_B, nn.Identity(), scaling),
        "per-token-matrices": per_token_matrices,
        **{v: fused[v] for v in REFERENCE if v in fused},
    }


def check_agreement(fns, tol: float = 1e-3):
    """The deltas-space variants compute the same thing; fail loudly if not (`tol`: the
    largest absolute difference allowed, relative to the output's largest entry)."""
    x = fns["x"][:, :64]
    ref = fns["peft-arrow"](x)
    tol = tol * max(1.0, ref.abs().max().item())
    for name in ("fused-deltas", "reference-deltas"):
        if name not in fns:
            continue
        err = (fns[name](x) - ref).abs().max().item()
        if err > tol:
            raise SystemExit(f"{name} disagrees with PEFT's Arrow layer: max abs diff {err}")
    err = (fns["per-token-matrices"](x) - fns["fused-factors"](x)).abs().max().item()
    if err > tol:
        raise SystemExit(f"per-token matrices disagree with fused factors: {err}")


def _sync(x) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def time_all(fns, variants, rounds: int, inner: int) -> tuple[dict, dict]:
    """Median seconds per call and median per-round ratio to the Linear, per variant.

    Variants are interleaved within each round (in a rotating order) so that the load of
    a shared machine hits them alike.
    """
    times = {v: [] for v in variants}
    with torch.inference_mode():
        for v in variants:
            fns[v](fns["x"])  # warm-up
        for r in range(rounds):
            for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
                _sync(fns["x"])
                t0 = time.perf_counter()
                for _ in range(inner):
                    fns[v](fns["x"])
                _sync(fns["x"])
                times[v].append((time.perf_counter() - t0) / inner)
    seconds = {v: statistics.median(ts) for v, ts in times.items()}
    ratios = {
        v: statistics.median(a / b for a, b in zip(ts, times["linear"])) for v, ts in times.items()
    }
    return seconds, ratios


def peak_memory(variant: str, args, fns) -> float:
    """Peak extra memory (MiB) of one call: resident memory, measured in a fresh process
    (CPU), or CUDA's peak allocation over what was allocated before the call (GPU)."""
    if args.device != "cpu":
        x = fns["x"]
        with torch.inference_mode():
            out = fns["linear"](x)  # the output every variant must hold anyway
            del out
            _sync(x)
            torch.cuda.reset_peak_memory_stats(x.device)
            before = torch.cuda.memory_allocated(x.device)
            fns[variant](x)
            _sync(x)
        return (torch.cuda.max_memory_allocated(x.device) - before) / 2**20
    cmd = [sys.executable, __file__, "--memory-of", variant, *sys.argv[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(args) -> None:
    torch.set_num_threads(args.threads)
    fns = build(args)
    with torch.inference_mode():
        out = fns["linear"](fns["x"])  # the output every variant must hold anyway
        del out
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current size
        before = _status_kib("VmRSS")
        fns[args.memory_of](fns["x"])
        peak = _status_kib("VmHWM")
    print(json.dumps({"extra_mib": (peak - before) / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=2560)
    p.add_argument("--experts", type=int, default=10)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--inner", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--reference", action="store_true", help="also time the reference forward")
    p.add_argument("--memory-of", choices=VARIANTS + REFERENCE, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_of:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    fns = build(args)
    check_agreement(fns, 1e-3 if args.dtype == "fp32" else 3e-2)
    variants = VARIANTS + (REFERENCE if args.reference else [])
    t, ratio = time_all(fns, variants, args.rounds, args.inner)
    D = O = args.dim
    N, R = args.experts, args.rank
    floor = 1 + N * R * (D + O) / (D * O)
    print(
        f"one layer D=O={D}, N={N}, R={R}, tokens={args.tokens}, per-token top-{args.top_k} "
        f"softmax coefficients, {args.dtype} on {args.device}, {args.threads} threads, "
        f"torch {torch.__version__}; "
        f"median of {args.rounds} interleaved rounds x {args.inner} calls (x Linear: median "
        "of the per-round ratios)"
    )
    from lorafuse.fast import gemm

    print(f"cpu: {gemm.cpu_line()}; oneDNN products in the plans: {gemm.enabled()}")
    if args.device != "cpu":
        print(f"device: {torch.cuda.get_device_name(torch.device(args.device))}")
    print(f"{'variant':<22}{'ms/call':>10}{'x Linear':>10}{'peak extra MiB':>16}")
    for v in variants:
        mem = peak_memory(v, args, fns)
        print(f"{v:<22}{t[v] * 1e3:>10.2f}{ratio[v]:>10.3f}{mem:>16.1f}")
    print(f"{'arithmetic floor':<22}{'':>10}{floor:>10.3f}")


if __name__ == "__main__":
    main()
