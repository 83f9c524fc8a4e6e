"""The paper's full setup, planned from measurements: each stage's time, on 1 and K devices.

The setup: Phi-2 (32 decoder layers, hidden 2560, MLP 10240, vocabulary 51,200), the 256
private Flan experts and the 10 MBC experts (rank 4), flan-10k-flat's 256 tasks, and the
`full` study preset (lorafuse/study/presets/full.yaml: its example caps per task, its lr
grid, epochs, batch size and validation interval, its methods and analyses, read here).

How each figure is made (nothing in it is a guess but the two inputs named below):
1. Per-token seconds of every kind of pass the study makes are MEASURED on this device
   (`--device`, `--dtype`): a Phi-2 cut to ONE decoder layer with Phi-2's real widths and
   vocabulary, with random experts of rank 4 on all six of its linear layers (q, k, v,
   dense, fc1, fc2), attached by lorafuse as the study attaches them, on B x T tokens.
   The layer is timed through the decoder alone (embedding, the layer, the final norm;
   for a backward, the gradient of the mean square of its output), and the output head
   (the 2560 x 51,200 product and the loss) alone, forward and forward + backward.
2. Scaled by the arithmetic to the whole model: per token = head + 32 x layer(K).
3. Tokens per stage, from the preset: examples per task (fit, validation, test caps) x
   256 tasks x `--tokens-per-example` (INPUT 1: the mean length of a flan-10k-flat
   example in Phi-2's tokens, source and target; measure it on the data where you have
   it); an SGD fit makes lr grid x epochs x fit tokens of forward + backward and, every
   `eval_every` steps of `batch_size` examples, one validation pass (no early stop: an
   upper bound; patience usually stops sooner).
4. K devices: every stage here is data-parallel under `accelerate launch` (each process
   a 1/K share of the examples, lorafuse/parallel.py), so its time is divided by K; the
   analyses on the main process (clustering, the LP, greedy: seconds) are not.
5. On a CPU the table is this CPU's. `--project-tflops S` (INPUT 2) adds a column for a
   device of S sustained TFLOP/s: one adapter's forward per token becomes Phi-2's FLOPs
   per token (counted: 2 x multiply-adds of every product, attention over T / 2
   positions on average; an adapter of rank 4 adds 0.1%) / S, and every other kind keeps
   its MEASURED ratio to one adapter's forward. The anchor is one adapter, not the bare
   model, because the fused layers run lorafuse's products (oneDNN's where
   lorafuse.fast.gemm finds them faster) while the bare model runs torch's, which on some
   CPUs are twice as slow at these shapes: a ratio to the bare model would carry that CPU
   difference to the GPU. Run this script on the GPU itself (`--device cuda --dtype
   bf16`) to replace the projection by its measurements.

    python bench/paper_plan.py                                  # this CPU, fp32
    python bench/paper_plan.py --project-tflops 400             # + a 400 TFLOP/s column
    python bench/paper_plan.py --device cuda --dtype bf16 --batch 8 --seq 512
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAYERS, D, MLP, VOCAB, HEADS = 32, 2560, 10240, 51200, 32  # Phi-2
TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
TASKS, MBC, PRIVATE, RANK = 256, 10, 256, 4


# ---- step 1: the per-token seconds of each kind of pass ---------------------------------
def phi_layer(device, dtype):
    """Phi-2 with one decoder layer (its real widths and vocabulary), random weights."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    cfg = PhiConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=MLP, num_hidden_layers=1,
        num_attention_heads=HEADS, partial_rotary_factor=0.4, max_position_embeddings=2048,
    )  # fmt: skip
    model = PhiForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def random_library(model, n: int, seed: int):
    """n random rank-4 experts (alpha 16) on TARGETS of `model`, built in memory."""
    from lorafuse.factors import StackedModule
    from lorafuse.library import Expert, ExpertLibrary

    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, m in model.named_modules():
        if name.split(".")[-1] in TARGETS:
            O, Din = m.weight.shape
            A = torch.randn(n, RANK, Din, generator=g) / math.sqrt(Din)  # (N, R, D)
            B = torch.randn(n, O, RANK, generator=g) * 0.01  # (N, O, R)
            modules[name] = StackedModule(A, B, torch.full((n,), 4.0), torch.full((n,), RANK))
    experts = [Expert(f"e{i}", r=RANK, lora_alpha=16.0) for i in range(n)]
    return ExpertLibrary(experts, modules)


def timed(fn, device, repeats: int) -> float:
    """Seconds of fn(): the fastest of `repeats` calls after one warm-up."""
    fn()
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def forward(model, ids):
    """One forward of the decoder (no head) over ids (B, T)."""

    def run():
        with torch.inference_mode():
            model.model(input_ids=ids)

    return run


def train(model, ids, params):
    """One forward and backward of the decoder (no head), gradients to `params`."""

    def run():
        h = model.model(input_ids=ids).last_hidden_state  # (B, T, D)
        h.float().square().mean().backward()
        for p in params:
            p.grad = None

    return run


def measure(args) -> dict[str, float]:
    """Per-token seconds of one decoder layer of each kind (key "layer <kind>"), of the
    head (forward and forward + backward) and of the whole 1-layer model's forward."""
    from lorafuse.mixers.hierarchical import build_hc_routers
    from lorafuse.mixers.routers import build_routers, router_parameters
    from lorafuse.mixers.static import Learned, Uniform
    from lorafuse.model import attach

    device, dtype = (
        torch.device(args.device),
        {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype],
    )
    model = phi_layer(device, dtype)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=g).to(device)  # (B, T)
    M, rep = ids.numel(), args.repeats
    t: dict[str, float] = {}

    # the head alone: final norm, the (D, V) product, the loss; forward and with backward
    x = torch.randn(args.batch, args.seq, D, generator=g).to(device=device, dtype=dtype)
    x.requires_grad_(True)

    def head(grad: bool):
        def run():
            h = model.model.final_layernorm(x)
            logits = model.lm_head(h).float()  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
            if grad:
                loss.backward()
                x.grad = None

        return run

    with torch.inference_mode():
        t["head fwd"] = timed(head(False), device, rep) / M
    t["head fwd+bwd"] = timed(head(True), device, rep) / M

    def whole():
        with torch.inference_mode():
            model(input_ids=ids, logits_to_keep=ids.shape[1])

    t["model base fwd"] = timed(whole, device, rep) / M

    def layer(kind: str, fn) -> None:
        t[f"layer {kind}"] = timed(fn, device, rep) / M
        print(f"  one layer, {kind}: {t[f'layer {kind}'] * 1e3:.3f} ms/token", flush=True)

    layer("base fwd", forward(model, ids))
    one = random_library(model, 1, 1)
    fusion = attach(model, one, "factors", Uniform(1))
    layer("one LoRA fwd", forward(model, ids))
    learned = Learned(1).to(device)
    fusion.set_mixer(learned)  # a LoRA whose (one) weight trains: the student's backward
    layer("one LoRA fwd+bwd", train(model, ids, [learned.logits]))
    fusion.detach()

    mbc = random_library(model, MBC, 2)
    fusion = attach(model, mbc, "factors")
    dense = build_routers(mbc, device, "linear")
    with torch.no_grad():  # input-dependent routing (a trained router's cost)
        for r in dense.values():
            r.weight.normal_(0, 0.05, generator=None)
    fusion.set_mixers(dense)
    layer("route 10 fwd", forward(model, ids))
    layer("route 10 fwd+bwd", train(model, ids, list(router_parameters(dense).values())))
    fusion.set_mixers(build_routers(mbc, device, "arrow"))
    layer("arrow 10 fwd", forward(model, ids))
    merge = {m: Learned(MBC).to(device) for m in mbc.modules}  # merge-sgd-layer's mixers
    fusion.set_mixers(merge)
    layer("merge 10 fwd+bwd", train(model, ids, [m.logits for m in merge.values()]))
    fusion.detach()

    private = random_library(model, PRIVATE, 3)
    fusion = attach(model, private, "factors")
    fusion.set_mixers(build_routers(private, device, "arrow", top_k=4))
    layer("arrow 256 top-4 fwd", forward(model, ids))
    labels = torch.arange(PRIVATE) % MBC  # 10 clusters of the private experts
    hc = build_hc_routers(private, device, labels, arrow_init=True)
    fusion.set_mixers(hc)
    layer("hc 256 fwd", forward(model, ids))
    layer("hc 256 fwd+bwd", train(model, ids, fusion.mixer_parameters()))
    fusion.detach()
    return t


# ---- steps 2-5: the arithmetic ------------------------------------------------------------
def flops_per_token(seq: int) -> float:
    """FLOPs of Phi-2's forward per token: every product (2 per multiply-add) and the
    attention over seq / 2 positions on average (scores and the weighted sum)."""
    per_layer = 4 * D * D + 2 * D * MLP + 2 * D * (seq / 2)
    return 2.0 * (LAYERS * per_layer + D * VOCAB)


@dataclass
class Stage:
    name: str
    passes: list[tuple[str, float]]  # (kind of pass, tokens)


def stages(cfg, L: float) -> list[Stage]:
    """The full study's passes, per stage: what the methods of the preset run (step 3)."""
    fd = cfg.fit_defaults
    X = {s: TASKS * n * L for s, n in cfg.examples.model_dump().items()}  # tokens per split
    grid, epochs, batch = len(fd["lr_grid"]), fd["epochs"], fd["batch_size"]
    steps = epochs * (TASKS * cfg.examples.fit // batch)
    vals = grid * math.ceil(steps / fd["eval_every"])

    def sgd(train_kind: str, val_kind: str) -> list[tuple[str, float]]:
        return [(train_kind, grid * epochs * X["fit"]), (val_kind, vals * X["validation"])]

    names = [(m.name, m.experts) for m in cfg.method_list()]
    out = [
        Stage("evaluate 9 one-adapter methods (test)", [("one LoRA fwd", 9 * X["test"])]),
        Stage("evaluate base (test)", [("base fwd", X["test"])]),
        Stage(
            "cache: 10 MBC experts x (fit + validation + test)",
            [("one LoRA fwd", MBC * (X["fit"] + X["validation"] + X["test"]))],
        ),
        Stage(
            "evaluate ensemble-uniform-logits (10 passes, test)",
            [("one LoRA fwd", MBC * X["test"])],
        ),
        Stage(
            "cache: 256 private experts x test (ensemble-uniform@private)",
            [("one LoRA fwd", PRIVATE * X["test"])],
        ),
        Stage(
            "evaluate arrow, arrow-top1, arrow-top4 @mbc (test)", [("arrow 10 fwd", 3 * X["test"])]
        ),
        Stage("evaluate arrow-top4@private (test)", [("arrow 256 top-4 fwd", X["test"])]),
        Stage(
            "fit merge-sgd-global and merge-sgd-layer", 2 * sgd("merge 10 fwd+bwd", "one LoRA fwd")
        ),
        Stage("fit route-sgd", sgd("route 10 fwd+bwd", "route 10 fwd")),
        Stage("evaluate route-sgd, -top1, -top4 (test)", [("route 10 fwd", 3 * X["test"])]),
        Stage("fit ensemble-distill (the student)", sgd("one LoRA fwd+bwd", "one LoRA fwd")),
        Stage("fit route-hc and route-arrow-hc", 2 * sgd("hc 256 fwd+bwd", "hc 256 fwd")),
        Stage("evaluate route-hc, route-arrow-hc (test)", [("hc 256 fwd", 2 * X["test"])]),
        Stage(
            "analyses: expert x task matrix, 256 private x validation",
            [("one LoRA fwd", PRIVATE * X["validation"])],
        ),
    ]
    conn = cfg.analyses.connectivity
    if conn is not None:
        pairs = conn.max_pairs or 4
        out.append(Stage(f"analyses: connectivity, {pairs} pairs x {conn.alphas} points",
                         [("one LoRA fwd", pairs * conn.alphas * X["validation"])]))  # fmt: skip
    want = {
        ("oracle", "mbc"),
        ("shared", "mbc"),
        ("merge-uniform", "mbc"),
        ("merge-uniform-full", "mbc"),
        ("ensemble-distill", "mbc"),
        ("merge-sgd-global", "mbc"),
        ("merge-sgd-layer", "mbc"),
        ("oracle", "private"),
        ("merge-uniform", "private"),
    }  # fmt: skip  (the 9 one-adapter evaluations)
    missing = sorted(want - set(names))
    if missing:
        raise SystemExit(f"the preset no longer lists {missing}: update stages()")
    return out


def per_token(t: dict[str, float], kind: str) -> float:
    """Seconds per token of the whole model (step 2): head + 32 layers of this kind."""
    head = t["head fwd+bwd" if "bwd" in kind else "head fwd"]
    return head + LAYERS * t[f"layer {kind}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128, help="tokens per row when measuring")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens-per-example", type=float, default=256.0,
                    help="INPUT 1: mean Phi-2 tokens of a flan-10k-flat example")  # fmt: skip
    ap.add_argument("--devices", type=int, default=8, help="K for the K-device column")
    ap.add_argument("--project-tflops", type=float, default=None,
                    help="INPUT 2: add a column for a device of this many TFLOP/s")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from lorafuse.fast.gemm import cpu_line
    from lorafuse.study.config import preset_config

    torch.manual_seed(args.seed)
    cfg = preset_config("full")
    where = cpu_line() if args.device == "cpu" else torch.cuda.get_device_name(args.device)
    print(f"measuring on {where}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"{args.batch} x {args.seq} tokens, torch {torch.__version__}", flush=True)  # fmt: skip
    start = time.perf_counter()
    t = measure(args)
    kinds = sorted(k[len("layer ") :] for k in t if k.startswith("layer "))
    base = per_token(t, "base fwd")
    print(f"\nmeasured in {time.perf_counter() - start:.0f} s. Per token, the whole model "
          f"(head + {LAYERS} layers):")  # fmt: skip
    anchor = per_token(t, "one LoRA fwd")
    print("| kind of pass | ms / token | over one adapter's forward |\n|---|---:|---:|")
    for k in kinds:
        print(f"| {k} | {per_token(t, k) * 1e3:.3g} | {per_token(t, k) / anchor:.2f}x |")
    check = t["model base fwd"] / (t["head fwd"] + t["layer base fwd"])
    print(f"(the 1-layer model timed whole / head + layer, a check of step 1: {check:.3f})")
    for name, sec in (("the bare model (torch's products)", base), ("one adapter", anchor)):
        print(f"forward of {name}: {flops_per_token(args.seq) / 1e9:.2f} GFLOP per token at "
              f"{args.seq} positions, {flops_per_token(args.seq) / sec / 1e12:.4f} TFLOP/s "
              "achieved here")  # fmt: skip

    L, K, S = args.tokens_per_example, args.devices, args.project_tflops
    plan = stages(cfg, L)
    scale = None if S is None else flops_per_token(L) / (S * 1e12) / anchor
    head = f"| stage | tokens | 1 device | {K} devices |"
    rule = "|---|---:|---:|---:|"
    if scale is not None:
        head += f" projected, 1 x {S:g} TFLOP/s | {K} x {S:g} TFLOP/s |"
        rule += "---:|---:|"
    print(f"\nThe `full` preset, {L:g} tokens per example, examples per task "
          f"{cfg.examples.model_dump()}:\n{head}\n{rule}")  # fmt: skip
    total = 0.0
    for s in plan:
        sec = sum(per_token(t, k) * n for k, n in s.passes)
        tokens = sum(n for _, n in s.passes)
        total += sec
        row = f"| {s.name} | {tokens / 1e6:,.1f} M | {_dur(sec)} | {_dur(sec / K)} |"
        if scale is not None:
            row += f" {_dur(sec * scale)} | {_dur(sec * scale / K)} |"
        print(row)
    row = f"| **all** | | {_dur(total)} | {_dur(total / K)} |"
    if scale is not None:
        row += f" {_dur(total * scale)} | {_dur(total * scale / K)} |"
    print(row)


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} d"


if __name__ == "__main__":
    main()
