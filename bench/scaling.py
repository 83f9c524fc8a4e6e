"""Cost as the library grows: every stage at N = 8 ... 1,024 random experts, in ONE run.

For each N, a fresh process (so that one N's memory does not flatter or burden the
next) times each stage and measures its peak extra resident memory (VmHWM reset before
the stage, minus VmRSS then). A stage runs once as a warm-up (its memory), then its
time is the fastest of 3 more runs (the first run's time when that took over 3 s).
Random PEFT adapters (r 4, alpha 16, `init_lora_weights=False`) are written once for
the largest N; each N loads the first N.

Two models, both built here with transformers:
- phi: one Phi-2 decoder layer (PhiConfig: hidden 2560, MLP 10240, 32 heads, Phi-2's
  partial rotary), a 128-token vocabulary; the experts adapt q_proj and v_proj
  (D = O = 2560), so a library holds 2 modules of N x 4 x (2560 + 2560) factors.
- pico: the pico Llama of bench/routing.py (hidden 128, 4 layers, its character data);
  the experts adapt all 7 projections of every layer (28 modules).
Stages (the library's own APIs):
- load: ExpertLibrary.load from disk (pico: through Workspace.library);
- attach: lorafuse.model.attach (each layer's plans from lorafuse.fast.choose);
- routers: build_routers (Arrow prototypes of every expert, for the top-4 router);
- fwd+bwd dense / top-4: one forward and backward of B x T tokens, the routers learning
  (dense: linear routers, softmax over all N; top-4: linear routers started from Arrow,
  the 4 largest coefficients kept);
- decode dense / Arrow top-4: one decoding step of one sequence with the KV cache
  (lorafuse.generate.ModelDecoder), dense linear or zero-shot Arrow top-4 routers;
- cache pass (pico): lorafuse.cache.expert_target_logprobs, every expert's pass over the
  validation split (one-hot coefficients, n experts per forward);
- exact solve: lorafuse.fit.exact.fit_ensemble on that cache's probabilities P (M, N);
  "before" runs it with NEWTON_SIZE = N, as it was before its Newton step was capped
  (every free coordinate moves in every step: M S^2 + S^3 work, S up to N);
- minimax LP: lorafuse.fit.minimax.fit_minimax on an error matrix (N, T = 256 tasks);
- greedy: lorafuse.select.greedy.greedy_select, the whole path (k = 1..N) on a loss
  matrix (N, 256);
- MBC: lorafuse.select.clustering.mbc_cluster of the phi library (10 clusters);
- HC routers / HC fwd+bwd: build_hc_routers over those clusters (Arrow init), then one
  forward and backward through them.
The loss and error matrices are synthetic (each expert good at one task, T = 256 fixed as
in the paper's library): what the two fits and greedy cost depends on N and T, not on
where the numbers come from.

Beside the stages, the routed layer (phi q_proj, 2,048 tokens, inference) is timed
against its bare nn.Linear in interleaved rounds (median of per-round ratios) next to
the arithmetic floor 1 + N*R*(D+O)/(D*O). Each stage's growth exponent in N is fitted by
least squares on log-log, over all N and over the last two N (the asymptotic slope).

    python bench/scaling.py                 # N = 8, 32, 128, 256, 1024; docs/scaling.png
    python bench/scaling.py --quick         # N <= 256
    python bench/scaling.py --quick --plot /tmp/scaling.png   # keep the README's figure

Matrix products are torch's (LORAFUSE_ONEDNN=0 unless set), as in bench/fused_layer.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("LORAFUSE_ONEDNN", "0")  # like for like: torch's products everywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FULL = [8, 32, 128, 256, 1024]
QUICK = [8, 32, 128, 256]
PHI_TARGETS = ["q_proj", "v_proj"]
PICO_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TASKS = 256  # T of the synthetic loss / error matrices
# (key, label, goal exponent): the goal is linear, or N^2 for the pairwise stages
STAGES = [
    ("phi.load", "phi: load", 1),
    ("phi.attach", "phi: attach", 1),
    ("phi.routers", "phi: build routers (Arrow)", 1),
    ("phi.train_dense", "phi: fwd+bwd dense", 1),
    ("phi.train_top4", "phi: fwd+bwd top-4", 1),
    ("phi.decode_dense", "phi: decode step dense", 1),
    ("phi.decode_top4", "phi: decode step Arrow top-4", 1),
    ("phi.mbc", "phi: MBC clustering (10)", 2),
    ("phi.hc_build", "phi: HC routers (build)", 1),
    ("phi.hc_train", "phi: HC fwd+bwd", 1),
    ("pico.load", "pico: load", 1),
    ("pico.attach", "pico: attach", 1),
    ("pico.train_dense", "pico: fwd+bwd dense", 1),
    ("pico.train_top4", "pico: fwd+bwd top-4", 1),
    ("pico.decode_dense", "pico: decode step dense", 1),
    ("pico.decode_top4", "pico: decode step Arrow top-4", 1),
    ("pico.cache", "pico: cache pass (all experts)", 1),
    ("fit.exact", "exact ensemble solve", 1),
    ("fit.exact_before", "  before: Newton on all N", 1),
    ("fit.minimax", f"minimax LP (T={TASKS})", 1),
    ("select.greedy", f"greedy, whole path (T={TASKS})", 2),
]


# ---- set-up: the two models and the experts on disk (once, in the parent) -------------
def make_phi(path: Path) -> Path:
    """One Phi-2 decoder layer (hidden 2560) with a small vocabulary, saved."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    cfg = PhiConfig(
        vocab_size=128, hidden_size=2560, intermediate_size=10240, num_hidden_layers=1,
        num_attention_heads=32, partial_rotary_factor=0.4, max_position_embeddings=256,
    )  # fmt: skip
    PhiForCausalLM(cfg).save_pretrained(path)
    return path


def write_experts(base: Path, out: Path, n: int, targets: list[str], seed: int) -> list[Path]:
    """n random PEFT adapters (r 4, alpha 16) saved under `out`: each expert's factors drawn
    as peft draws them with `init_lora_weights=False` (nn.Linear's own initialisation)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(model, cfg)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    dirs = []
    for i in range(n):
        torch.manual_seed(seed + i)
        for m in layers:  # peft's reset with init_lora_weights=False leaves them as they are
            m.lora_A["default"].reset_parameters()
            m.lora_B["default"].reset_parameters()
        dirs.append(out / f"e{i:04d}")
        model.save_pretrained(dirs[-1])
    return dirs


def set_up(root: Path, n: int) -> None:
    """The phi base, the pico benchmark folder, and n experts of each."""
    from routing import build_pico  # bench/routing.py: the pico Llama and its data

    make_phi(root / "phi" / "base")
    write_experts(root / "phi" / "base", root / "phi" / "experts", n, PHI_TARGETS, 1000)
    build_pico(root / "pico", 0, 0)
    write_experts(root / "pico" / "base", root / "pico" / "experts", n, PICO_TARGETS, 5000)


# ---- measuring one stage ---------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(fn, undo=None, repeats: int = 3, long: float = 3.0):
    """(seconds, peak extra MiB, fn's result). The first call is a warm-up and gives the
    memory; the time is the fastest of `repeats` more calls (`undo(result)` before each:
    the least disturbed by other work on the machine), or the first call's when it took
    over `long` seconds."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current size
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    peak = (_status_kib("VmHWM") - before) / 1024
    if first > long:
        return first, peak, out
    times = []
    for _ in range(repeats):
        if undo is not None:
            undo(out)
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), peak, out


# ---- the stages of one N (in a child process) -------------------------------------------
def model_stages(tag: str, model, lib, ids, results: dict, load_s) -> object:
    """attach, routers, fwd+bwd and decoding on one model; returns the Fusion."""
    from lorafuse.generate import ModelDecoder
    from lorafuse.mixers.routers import build_routers, router_parameters
    from lorafuse.model import attach

    results[f"{tag}.load"] = load_s
    t, mem, fusion = measure(lambda: attach(model, lib), undo=lambda f: f.detach())
    results[f"{tag}.attach"] = (t, mem)
    t, mem, arrow = measure(lambda: build_routers(lib, "cpu", "arrow", top_k=4))
    results[f"{tag}.routers"] = (t, mem)
    dense = build_routers(lib, "cpu", "linear")
    top4 = build_routers(lib, "cpu", "linear", init="arrow", top_k=4)
    with torch.no_grad():  # input-dependent routing (a trained router's cost)
        for r in dense.values():
            r.weight.normal_(0, 0.05)

    for name, routers in (("dense", dense), ("top4", top4)):
        fusion.set_mixers(routers)
        step = train_step(model, ids, list(router_parameters(routers).values()))
        results[f"{tag}.train_{name}"] = measure(step)[:2]
    prompt = ids[:1, :16]
    for name, routers in (("dense", dense), ("top4", arrow)):
        fusion.set_mixers(routers)
        dec = ModelDecoder(model)
        with torch.inference_mode():
            dec.start(prompt, torch.ones_like(prompt))
            tok = prompt[:, -1]
            results[f"{tag}.decode_{name}"] = measure(partial(dec.step, tok), repeats=7)[:2]
    return fusion, dense, arrow


def train_step(model, ids, params):
    """One forward and backward of the next-token loss on ids (B, T), gradients to params."""

    def step():
        logits = model(input_ids=ids).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        for p in params:
            p.grad = None

    return step


def layer_ratio(fusion, routers: dict, tokens: int, rounds: int, inner: int = 2) -> dict:
    """Median per-round time of the routed q_proj over its bare layer, per router kind."""
    name = next(n for n in fusion.layers if n.endswith("q_proj"))
    layer = fusion.layers[name]
    x = torch.randn(1, tokens, layer.A_rows.shape[1], generator=torch.Generator().manual_seed(0))
    kinds = list(routers)
    times = {k: [] for k in ["bare", *kinds]}

    def run(kind):
        return layer.base(x) if kind == "bare" else layer(x)

    with torch.inference_mode():
        for k in times:  # warm-up
            if k != "bare":
                layer.mixer = routers[k][name]  # chooses the layer's plans (off the clock)
            run(k)
        for r in range(rounds):
            order = list(times)[r % len(times) :] + list(times)[: r % len(times)]
            for k in order:
                if k != "bare":
                    layer.mixer = routers[k][name]
                t0 = time.perf_counter()
                for _ in range(inner):
                    run(k)
                times[k].append((time.perf_counter() - t0) / inner)
    out = {k: statistics.median(a / b for a, b in zip(times[k], times["bare"])) for k in kinds}
    return out | {"bare_s": statistics.median(times["bare"])}


def synthetic_losses(N: int, T: int, seed: int) -> np.ndarray:
    """(N, T) losses: 2 + noise, each expert 1 lower on its own task i mod T."""
    rng = np.random.default_rng(seed)
    L = 2.0 + 0.5 * rng.random((N, T))
    L[np.arange(N), np.arange(N) % T] -= 1.0
    return L


def child(args) -> None:
    from transformers import AutoModelForCausalLM

    from lorafuse.cache import expert_target_logprobs
    from lorafuse.fit import exact
    from lorafuse.fit.exact import fit_ensemble
    from lorafuse.fit.minimax import fit_minimax
    from lorafuse.library import ExpertLibrary
    from lorafuse.mixers.hierarchical import build_hc_routers
    from lorafuse.select.clustering import mbc_cluster
    from lorafuse.select.greedy import greedy_select
    from lorafuse.spec import load_spec
    from lorafuse.workspace import Workspace

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    N, root = args.child, Path(args.root)
    load = [os.getloadavg()[0]]
    res: dict = {}
    g = torch.Generator().manual_seed(0)

    # phi: one Phi-2 layer
    dirs = sorted((root / "phi" / "experts").iterdir())[:N]
    t, mem, lib = measure(lambda: ExpertLibrary.load(dirs))
    model = AutoModelForCausalLM.from_pretrained(root / "phi" / "base").eval()
    ids = torch.randint(0, 128, (args.batch, args.seq), generator=g)  # (B, T)
    fusion, dense, arrow = model_stages("phi", model, lib, ids, res, (t, mem))
    ratio = layer_ratio(fusion, {"dense": dense, "top4": arrow}, args.tokens, args.rounds)
    k = min(10, N)
    t, mem, clusters = measure(lambda: mbc_cluster(lib, k=k, seed=0), repeats=1)
    res["phi.mbc"] = (t, mem)
    labels = torch.as_tensor(clusters.labels)
    t, mem, hc = measure(lambda: build_hc_routers(lib, "cpu", labels, arrow_init=True))
    res["phi.hc_build"] = (t, mem)
    fusion.set_mixers(hc)

    res["phi.hc_train"] = measure(train_step(model, ids, fusion.mixer_parameters()))[:2]
    fusion.detach()
    del fusion, dense, arrow, hc, lib, model
    gc.collect()

    # pico: the Llama of bench/routing.py with its data, through a Workspace
    spec = load_spec(root / "pico")
    dirs = sorted((root / "pico" / "experts").iterdir())[:N]
    spec = spec.model_copy(update={"experts": {"scaling": [str(d) for d in dirs]}})
    ws = Workspace(spec)
    ws.model  # noqa: B018 (load the base model before the clock starts)
    t, mem, lib = measure(lambda: ws.library("scaling"), undo=lambda _: ws._libraries.clear())
    ids = torch.randint(3, ws.model.config.vocab_size, (args.batch, args.seq), generator=g)
    fusion, _, _ = model_stages("pico", ws.model, lib, ids, res, (t, mem))
    fusion.detach()
    t, mem, cache = measure(
        lambda: expert_target_logprobs(ws, "scaling", "validation", args.per_task), repeats=1
    )
    res["pico.cache"] = (t, mem)
    P, w = cache.logp.double().exp(), cache.token_weights()  # (M, N), (M,)
    t, mem, fit = measure(lambda: fit_ensemble(P, w))
    res["fit.exact"] = (t, mem)
    size = exact.NEWTON_SIZE
    exact.NEWTON_SIZE = N  # as before the fix: every free coordinate moves in a Newton step
    t, mem, before = measure(lambda: fit_ensemble(P, w))
    exact.NEWTON_SIZE = size
    res["fit.exact_before"] = (t, mem)
    errors = synthetic_losses(N, TASKS, 1)
    res["fit.minimax"] = measure(lambda: fit_minimax(errors))[:2]
    losses = synthetic_losses(N, TASKS, 2)
    res["select.greedy"] = measure(lambda: greedy_select(losses), repeats=1)[:2]
    info = {
        "M": int(P.shape[0]),
        "exact": [fit.iterations, fit.gap, int((fit.weights > 1e-10).sum()), fit.objective],
        "before": [before.iterations, before.gap, int((before.weights > 1e-10).sum()),
                   before.objective],
    }  # fmt: skip
    info["load"] = [*load, os.getloadavg()[0]]  # 1-minute load average, start and end
    print(json.dumps({"N": N, "stages": res, "ratio": ratio, "info": info}))


# ---- the parent: one child per N, then the table, the exponents and the plot ------------
def exponents(ns: list[int], ts: list[float]) -> tuple[float, float]:
    """Least-squares slope of log t on log N over all N, and over the last two N."""
    x, y = np.log(ns), np.log(ts)
    fit = float(np.polyfit(x, y, 1)[0])
    last = float((y[-1] - y[-2]) / (x[-1] - x[-2]))
    return fit, last


def plot(path: Path, ns: list[int], runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 7), sharey=True)
    groups = [("phi", "Phi-2 width (1 layer, q_proj + v_proj)"),
              ("other", "pico model, fits and selection")]  # fmt: skip
    for ax, (group, title) in zip(axes, groups):
        keys = [(k, label) for k, label, _ in STAGES if k.startswith("phi.") == (group == "phi")]
        lo = min(runs[ns[0]]["stages"][k][0] for k, _ in keys)
        for i, (key, label) in enumerate(keys):
            ts = [runs[n]["stages"][key][0] for n in ns]
            style = "--" if key.endswith("_before") else "-"
            ax.plot(ns, ts, style, marker="os^vD<>"[i % 7], color=plt.cm.tab20(i), label=label)
        for p, style in ((1, ":"), (2, "-.")):
            ax.plot(ns, [lo * (n / ns[0]) ** p for n in ns], "k" + style, lw=0.8, label=f"~N^{p}")
        ax.set(xscale="log", yscale="log", xlabel="experts N", title=title)
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    axes[0].set_ylabel("seconds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N = 8, 32, 128, 256")
    p.add_argument("--experts", type=int, nargs="+", help="the N to run (default: all five)")
    p.add_argument("--plot", default="docs/scaling.png")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="sequences per fwd+bwd")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument("--tokens", type=int, default=2048, help="tokens through the timed layer")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-task", type=int, default=4, help="validation examples per task")
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    ns = sorted(args.experts or (QUICK if args.quick else FULL))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lorafuse-scaling-") as tmp:
        set_up(Path(tmp), max(ns))
        setup_s = time.perf_counter() - start
        runs = {}
        for n in ns:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", str(n), "--root", tmp]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"the run for N={n} failed")
            runs[n] = json.loads(out.stdout.strip().splitlines()[-1])
    wall = time.perf_counter() - start
    report(args, ns, runs, setup_s, wall)
    plot(Path(args.plot), ns, runs)
    print(f"plot: {args.plot}")


def report(args, ns, runs, setup_s: float, wall: float) -> None:
    def row(label: str, cells) -> None:
        print(f"{label:<34}" + "".join(f"{c:>10}" for c in cells))

    load = os.getloadavg()
    print(
        f"N = {', '.join(map(str, ns))} random experts (r 4, alpha 16); {args.threads} threads, "
        f"fp32, torch {torch.__version__}, LORAFUSE_ONEDNN={os.environ['LORAFUSE_ONEDNN']}; "
        f"fwd+bwd on {args.batch} x {args.seq} tokens, decoding 1 sequence after 16 tokens; "
        f"load average at the end {load[0]:.2f}"
    )
    print(f"wall time {wall:.0f} s (set-up: writing {2 * max(ns)} adapters, {setup_s:.0f} s)")
    print("\nseconds, and (peak extra MiB); growth exponent in N: fit over all N, last two N")
    print(f"{'stage':<34}" + "".join(f"{n:>10}" for n in ns) + f"{'fit':>7}{'last':>7}{'goal':>6}")
    for key, label, goal in STAGES:
        ts = [runs[n]["stages"][key][0] for n in ns]
        fit, last = exponents(ns, ts) if len(ns) > 1 else (math.nan, math.nan)
        cells = "".join(f"{_secs(t):>10}" for t in ts)
        print(f"{label:<34}{cells}{fit:>7.2f}{last:>7.2f}{'N^' + str(goal):>6}")
        row("", [f"({runs[n]['stages'][key][1]:.0f})" for n in ns])
    row(
        "cache pass per expert, ms",
        [f"{runs[n]['stages']['pico.cache'][0] / n * 1e3:.1f}" for n in ns],
    )

    print(f"\nrouted q_proj / bare nn.Linear, {args.tokens} tokens, inference")
    row("", ns)
    D = O = 2560
    floors = [1 + n * 4 * (D + O) / (D * O) for n in ns]
    row("arithmetic floor", [f"{f:.3f}" for f in floors])
    for kind, label in (("dense", "dense linear router"), ("top4", "Arrow top-4")):
        row(label, [f"{runs[n]['ratio'][kind]:.3f}" for n in ns])
        row("  / floor", [f"{runs[n]['ratio'][kind] / f:.3f}" for n, f in zip(ns, floors)])
    row("bare layer, ms", [f"{runs[n]['ratio']['bare_s'] * 1e3:.1f}" for n in ns])
    row(
        "load average, start-end",
        ["-".join(f"{a:.1f}" for a in runs[n]["info"]["load"]) for n in ns],
    )

    M = runs[ns[0]]["info"]["M"]
    print(f"\nexact solve on the cache's P ({M} tokens x N): iterations, gap, support, objective")
    for n in ns:
        for name in ("exact", "before"):
            it, gap, support, f = runs[n]["info"][name]
            print(
                f"  N={n:<5} {name:<7}{it:>5} it, gap {gap:.1e}, support {support:>3}, f {f:.12f}"
            )


def _secs(t: float) -> str:
    return f"{t:.3g}" if t >= 0.01 else f"{t * 1e3:.2f}ms"


if __name__ == "__main__":
    main()
