"""Delta-space merges of N experts on one layer at Phi-2 size: lorafuse vs PEFT, in ONE run.

N random experts (A_i (R, D), B_i (O, R), scaling alpha / r = 2) on one Linear
(D = O = 2560, R = 4) are merged by every method of lorafuse.delta_merge and, where PEFT
has one, by PEFT's add_weighted_adapter on the same experts, weights and settings, to the
same output rank K (PEFT's `_svd` forms; `linear` keeps rank R on both sides).
- time: the median over --rounds rounds, lorafuse and PEFT interleaved within a round
  (in alternating order) so that the load of a shared machine hits both alike; each
  tool is warmed up first (a merge at D=O=64, one (O, D) SVD: LAPACK's first call at a
  size is slow).
- peak memory: one call per fresh process, the process's VmHWM after resetting it
  through /proc/self/clear_refs minus its resident size before the call (tracemalloc
  does not see torch's CPU allocator). Each process may grow its address space by at
  most --memory-cap-gib past its set-up; a merge that needs more shows "over cap" and
  is not timed (PEFT holds all N deltas (O, D) several times over; lorafuse a few (O, D)
  buffers whatever N).
- agree: each deterministic method against PEFT at a small size (--check-dim, same N),
  the largest difference of the merged deltas relative to their largest entry. DARE
  draws different masks in PEFT (its global RNG) and lorafuse (a generator per seed,
  module and expert), so it is not compared here (the tests check its properties).
Both tools spend much of a sparsifying merge in the one (O, D) SVD of the export.

    python bench/merge_methods.py [--experts 32] [--rank 16] [--rounds 3] [--seed 0]
    python bench/merge_methods.py --experts 256 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

# lorafuse method -> PEFT's combination_type (None: PEFT has none)
PEFT_TYPE = {
    "task-arithmetic": "svd",
    "ties": "ties_svd",
    "dare-linear": "dare_linear_svd",
    "dare-ties": "dare_ties_svd",
    "magnitude-prune": "magnitude_prune_svd",
    "breadcrumbs": None,
    "peft-linear": "linear",
}
RANDOM = {"dare-linear", "dare-ties"}


def options(method: str, args) -> tuple[dict, dict]:
    """(lorafuse's keywords, PEFT's keywords) for `method` under the script's settings."""
    rank = None if method == "peft-linear" else args.rank  # PEFT's linear: rank R, no SVD
    ours: dict = {"rank": rank}
    peft: dict = {} if rank is None else {"svd_rank": rank}
    if method in ("ties", "magnitude-prune"):
        ours["density"] = peft["density"] = args.density
    if method in RANDOM:
        ours |= {"drop": args.drop, "seed": args.seed}
        peft["density"] = 1.0 - args.drop
    if method == "breadcrumbs":
        ours |= {"density": args.crumbs_density, "gamma": args.gamma}
    return ours, peft


def experts(args, dim: int):
    """Random factors A (N, R, D), B (N, O, R), scalings (N,) and merge weights (N,)."""
    g = torch.Generator().manual_seed(args.seed)
    N, R = args.experts, args.r
    A = torch.randn(N, R, dim, generator=g) / dim**0.5  # (N, R, D)
    B = torch.randn(N, dim, R, generator=g) / R**0.5  # (N, O, R)
    scale = torch.full((N,), 2.0)  # alpha / r with alpha = 2 r
    weights = (0.5 + torch.rand(N, generator=g)) / N  # (N,)
    return A, B, scale, weights


def lorafuse_library(A, B, scale):
    """An ExpertLibrary of one module `proj` holding the factors."""
    from lorafuse.factors import StackedModule
    from lorafuse.library import Expert, ExpertLibrary

    N, R, _ = A.shape
    mod = StackedModule(A=A, B=B, scale=scale, rank=torch.full((N,), R))
    return ExpertLibrary([Expert(f"e{i}") for i in range(N)], {"proj": mod})


class OneLayer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)


def peft_model(A, B, scale):
    """A PeftModel over one Linear `proj` holding the experts as adapters e0, e1, ..."""
    from peft import LoraConfig, get_peft_model

    N, R, D = A.shape
    cfg = LoraConfig(
        target_modules=["proj"], r=R, lora_alpha=float(scale[0]) * R, init_lora_weights=False
    )
    model = get_peft_model(OneLayer(D), cfg, adapter_name="e0")
    for i in range(1, N):
        model.add_adapter(f"e{i}", cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for i in range(N):
            layer.lora_A[f"e{i}"].weight.copy_(A[i])
            layer.lora_B[f"e{i}"].weight.copy_(B[i])
    return model


def merge_lorafuse(lib, method, weights, kw):
    """lorafuse's merge (a MergedAdapter)."""
    from lorafuse.delta_merge import delta_merge

    return delta_merge(lib, method, weights.tolist(), **kw)


def merge_peft(model, method, weights, kw):
    """PEFT's add_weighted_adapter into adapter `merged` (deleted first if there)."""
    if "merged" in model.peft_config:
        model.delete_adapter("merged")
    names = [n for n in model.peft_config if n.startswith("e")]
    model.add_weighted_adapter(names, weights.tolist(), "merged", PEFT_TYPE[method], **kw)


def check(args) -> dict[str, float]:
    """Largest |lorafuse - PEFT| / max |PEFT| of the merged deltas, at --check-dim."""
    A, B, scale, weights = experts(args, args.check_dim)
    lib, out = lorafuse_library(A, B, scale), {}
    for method, kind in PEFT_TYPE.items():
        if kind is None or method in RANDOM:
            continue
        ours_kw, peft_kw = options(method, args)
        model = peft_model(A, B, scale)
        merge_peft(model, method, weights, peft_kw)
        ref = model.base_model.model.proj.get_delta_weight("merged").detach()  # (O, D)
        A2, B2 = merge_lorafuse(lib, method, weights, ours_kw).modules["proj"]
        out[method] = float((B2 @ A2 - ref).abs().max() / ref.abs().max())
    return out


def prepare(method: str, tool: str, args, dim: int):
    """The merge call of `tool` on experts at `dim`, ready to run (set-up off the clock)."""
    A, B, scale, weights = experts(args, dim)
    ours_kw, peft_kw = options(method, args)
    if tool == "lorafuse":
        lib = lorafuse_library(A, B, scale)
        return lambda: merge_lorafuse(lib, method, weights, ours_kw)
    model = peft_model(A, B, scale)
    return lambda: merge_peft(model, method, weights, peft_kw)


def warm_up(method: str, tool: str, args) -> None:
    """Off the clock: a merge at D=O=64 (imports, code paths) and one (O, D) SVD (LAPACK's
    first call at a size is slow; every `_svd` form makes one)."""
    prepare(method, tool, args, 64)()
    torch.linalg.svd(torch.randn(args.dim, args.dim), full_matrices=False)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(args) -> None:
    """One merge in this fresh process: prints its peak extra MiB, or that it is over cap."""
    torch.set_num_threads(args.threads)
    method, tool = args.memory_of.split(":")
    warm_up(method, tool, args)
    run = prepare(method, tool, args, args.dim)
    cap = _status_kib("VmSize") * 1024 + int(args.memory_cap_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current size
    before = _status_kib("VmRSS")
    try:
        run()
    except (RuntimeError, MemoryError) as e:  # torch: "can't allocate memory" or bad_alloc
        if not isinstance(e, MemoryError) and not any(
            word in str(e).lower() for word in ("memory", "bad_alloc")
        ):
            raise
        print(json.dumps({"over_cap": True}))
        return
    print(json.dumps({"mib": (_status_kib("VmHWM") - before) / 1024}))


def peak_memory(method: str, tool: str, args) -> dict:
    """{"mib": ...}, {"over_cap": True} or {"error": True}, from a fresh process."""
    cmd = [sys.executable, __file__, "--memory-of", f"{method}:{tool}", *sys.argv[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    if out.returncode != 0:
        print(f"{method} ({tool}) failed: {out.stderr.strip()[-2000:]}", file=sys.stderr)
        return {"error": True}
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_pair(method: str, tools: list[str], args) -> dict[str, float]:
    """Median seconds per tool over --rounds interleaved rounds, and the median ratio."""
    runs = {}
    for tool in tools:
        warm_up(method, tool, args)
        runs[tool] = prepare(method, tool, args, args.dim)
    times: dict[str, list[float]] = {t: [] for t in tools}
    for r in range(args.rounds):
        for tool in tools[r % len(tools) :] + tools[: r % len(tools)]:
            t0 = time.perf_counter()
            runs[tool]()
            times[tool].append(time.perf_counter() - t0)
    out = {t: statistics.median(ts) for t, ts in times.items()}
    if len(tools) == 2:
        out["ratio"] = statistics.median(p / o for o, p in zip(times["lorafuse"], times["peft"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--dim", type=int, default=2560)
    p.add_argument("--r", type=int, default=4, help="each expert's rank")
    p.add_argument("--rank", type=int, default=16, help="the merged adapter's rank K")
    p.add_argument("--density", type=float, default=0.2, help="ties, magnitude-prune")
    p.add_argument("--drop", type=float, default=0.9, help="DARE's drop rate p")
    p.add_argument("--crumbs-density", type=float, default=0.9, help="breadcrumbs")
    p.add_argument("--gamma", type=float, default=0.01, help="breadcrumbs")
    p.add_argument("--methods", nargs="+", default=list(PEFT_TYPE), choices=list(PEFT_TYPE))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-cap-gib", type=float, default=8.0)
    p.add_argument("--check-dim", type=int, default=256)
    p.add_argument("--child-timeout", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.memory_of:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    import peft

    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    agree = check(args)
    D, N = args.dim, args.experts
    print(
        f"one layer D=O={D}, N={N} experts of rank {args.r}, merged to rank K={args.rank} "
        f"(peft-linear: rank {args.r}, no SVD); density {args.density}, drop {args.drop}, "
        f"breadcrumbs density {args.crumbs_density} gamma {args.gamma}; seed {args.seed}; fp32, "
        f"{args.threads} threads, torch {torch.__version__}, peft {peft.__version__}. Time: "
        f"median of {args.rounds} interleaved rounds after a warm-up (x = median of the "
        "per-round PEFT/lorafuse ratios). Peak: VmHWM - VmRSS before the call, one call per "
        f"fresh process, address space capped at {args.memory_cap_gib:g} GiB past set-up. "
        f"agree: max |lorafuse - PEFT| / max |PEFT| at D=O={args.check_dim}"
    )
    head = ("method", "PEFT type", "lorafuse s", "PEFT s", "PEFT/ours", "ours MiB", "PEFT MiB")
    print(f"{head[0]:<17}{head[1]:<21}" + "".join(f"{h:>11}" for h in head[2:]) + f"{'agree':>10}")
    for method in args.methods:
        kind = PEFT_TYPE[method]
        mem = {"lorafuse": peak_memory(method, "lorafuse", args)}
        if kind:
            mem["peft"] = peak_memory(method, "peft", args)
        timed = [t for t, m in mem.items() if "mib" in m]  # PEFT over the cap: not timed
        t = time_pair(method, timed, args)
        cells = [
            f"{t['lorafuse']:.2f}" if "lorafuse" in t else "-",
            f"{t['peft']:.2f}" if "peft" in t else "-",
            f"{t['ratio']:.2f}" if "ratio" in t else "-",
            *(_memory_cell(mem.get(tool)) for tool in ("lorafuse", "peft")),
        ]
        check_cell = f"{agree[method]:.1e}" if method in agree else "-"
        print(
            f"{method:<17}{kind or '(none)':<21}" + "".join(f"{c:>11}" for c in cells)
            + f"{check_cell:>10}", flush=True,
        )  # fmt: skip
    after = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"load average (1, 5, 15 min) before {load_before}, after {after} on {os.cpu_count()} CPUs"
    )


def _memory_cell(m: dict | None) -> str:
    if m is None:
        return "-"
    if "over_cap" in m:
        return "over cap"
    return f"{m['mib']:.0f}" if "mib" in m else "error"


if __name__ == "__main__":
    main()
