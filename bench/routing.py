"""Routing cost, in ONE run: route-sgd vs one plain PEFT LoRA on the same model and data.

- training tokens/s: one route-sgd step (per-token linear routers on every fused layer,
  only the routers train) vs one step of training a single fresh PEFT LoRA (r 4,
  alpha 16, the experts' target modules), same batches, same loss, AdamW (goal >= 0.9x);
- generation tokens/s with the KV cache: the routed model (dense per-token routing at
  every layer, each new token routed as it is decoded) vs one expert loaded with
  PeftModel.from_pretrained (goal >= 0.95x). Greedy, every sequence forced to the same
  number of new tokens.
The routed model also runs with its reference forward (no plans, LORAFUSE_FAST=0) and,
on CPU, with its compiled kernels off (torch ops only, lorafuse.fast.kernels) and, where
lorafuse.fast.gemm uses oneDNN's products, with torch's own (MKL) products instead: the
like-for-like comparison with PEFT, which always runs torch's. Each variant sets its
switch and chooses the layers' plans again (`fusion.replan()`), as the switches are read
only then. Variants alternate round by round; the ratios are medians of the per-round
ratios.

    python bench/routing.py [--library runs/small] [--experts private]
    python bench/routing.py --pico          # a built-in pico setup (Llama, hidden 128)
    LORAFUSE_CPU_KERNELS=0 python bench/routing.py   # the routed layer with torch ops only
    LORAFUSE_ONEDNN=0 python bench/routing.py        # and with torch's (MKL) products only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def build_pico(root: Path, experts: int, seed: int) -> Path:
    """A benchmark folder: pico Llama (hidden 128, 4 layers), char data, random experts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from lorafuse.data.flan import write_flan
    from lorafuse.data.tokenizer import char_vocab, save_char_tokenizer

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(char_vocab()), hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    save_char_tokenizer(root / "base")
    g = torch.Generator().manual_seed(seed)
    rows, tasks = [], ["upper", "reverse", "sort", "double"]
    for task in tasks:
        for i in range(64):
            w = "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (12,), generator=g))
            target = {"upper": w.upper(), "reverse": w[::-1], "sort": "".join(sorted(w)),
                      "double": w + w}[task]  # fmt: skip
            split = "train" if i < 48 else ("validation" if i < 56 else "test")
            rows.append({"source": f"{task} the word {w} please", "target": target,
                         "task_name": task, "task_source": "pico", "template_type": "zs",
                         "template_idx": 0, "split": split})  # fmt: skip
    write_flan(rows, root / "data")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i in range(experts):
        base = AutoModelForCausalLM.from_pretrained(root / "base")
        torch.manual_seed(seed + 1 + i)
        lora = LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        get_peft_model(base, lora).save_pretrained(root / "experts" / "private" / f"e{i}")
    (root / "manifest.json").write_text(json.dumps({"tasks": tasks}))
    return root


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafuse import fast
    from lorafuse.fast import gemm, kernels
    from lorafuse.fit.data import TrainingSet
    from lorafuse.fit.sgd import epoch_order
    from lorafuse.methods.fused_sgd import fused_loss
    from lorafuse.mixers.routers import build_routers, router_parameters
    from lorafuse.model import attach
    from lorafuse.spec import load_spec
    from lorafuse.workspace import Workspace

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", default="runs/small")
    p.add_argument("--pico", action="store_true", help="build and use a pico setup instead")
    p.add_argument("--pico-experts", type=int, default=8)
    p.add_argument("--experts", default="private")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="training steps per round")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.pico:
        folder = build_pico(Path(tempfile.mkdtemp(prefix="lorafuse-pico-")), args.pico_experts,
                            args.seed)  # fmt: skip
    else:
        folder = Path(args.library)
        if not folder.exists():
            raise SystemExit(f"{folder} does not exist; pass --library <setup> or --pico")
    ws = Workspace(load_spec(folder))
    lib = ws.library(args.experts)
    data = TrainingSet(ws, "train")
    order = epoch_order(len(data), args.seed, 0)
    batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    batches = [b for b in batches if len(b) == args.batch_size][: args.steps]

    # route-sgd on ws.model; one fresh PEFT LoRA on its own copy of the base model.
    fusion = attach(ws.model, lib, "factors")
    routers = build_routers(lib, ws.device, "linear")
    fusion.set_mixers(routers)
    route_opt = torch.optim.AdamW(router_parameters(routers).values(), lr=1e-3)
    route_loss = fused_loss(ws, data)
    plain = AutoModelForCausalLM.from_pretrained(ws.base_id, dtype=ws.dtype).to(ws.device)
    lora = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=lib.module_summary())
    plain = get_peft_model(plain, lora).eval()
    plain_opt = torch.optim.AdamW([q for q in plain.parameters() if q.requires_grad], lr=1e-3)

    plain_ws = SimpleNamespace(
        model=plain,
        logits=lambda t: plain(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits,
    )
    plain_loss = fused_loss(plain_ws, data)  # the same loss code

    def train_round(loss_fn, opt):
        for idx in batches:
            loss_fn(idx).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    tokens = sum(int(data.batch(idx)["attention_mask"].sum()) for idx in batches)
    train_round(route_loss, route_opt)  # warm-up
    train_round(plain_loss, plain_opt)
    kern = kernels.routed() if ws.device.type == "cpu" else None
    dnn = gemm.enabled() and ws.device.type == "cpu"

    def switched_off(switch, fn):  # fn with one of lorafuse's speed-ups turned off
        def run():
            before = os.environ.get(switch)
            os.environ[switch] = "0"
            fusion.replan()  # the switches are read when plans are chosen
            try:
                fn()
            finally:
                if before is None:
                    del os.environ[switch]
                else:
                    os.environ[switch] = before
                fusion.replan()

        return run

    if dnn:  # warm-up of the MKL variant too
        switched_off(gemm.SWITCH, lambda: train_round(route_loss, route_opt))()
    switched_off(fast.SWITCH, lambda: train_round(route_loss, route_opt))()
    t_route, t_plain, t_ops, t_mkl, t_ref = [], [], [], [], []
    for _ in range(args.rounds):
        t_route.append(timed(lambda: train_round(route_loss, route_opt)))
        t_ref.append(timed(switched_off(fast.SWITCH, lambda: train_round(route_loss, route_opt))))
        if kern:
            t_ops.append(
                timed(switched_off(kernels.SWITCH, lambda: train_round(route_loss, route_opt)))
            )
        if dnn:
            t_mkl.append(
                timed(switched_off(gemm.SWITCH, lambda: train_round(route_loss, route_opt)))
            )
        t_plain.append(timed(lambda: train_round(plain_loss, plain_opt)))

    # Generation: routed (dense, routers perturbed so the routing is input-dependent)
    # vs one expert through PEFT.
    with torch.no_grad():
        for r in routers.values():
            r.weight.normal_(0, 0.05)
    one = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(ws.base_id, dtype=ws.dtype).to(ws.device),
        str(lib.experts[0].path),
    ).eval()
    sources = [s for s, _, _ in ws.examples("test")[: args.prompts]]
    enc = ws.tokenizer(  # left-padded: a decoder-only model continues from the right end
        sources, add_special_tokens=False, return_tensors="pt", padding=True, padding_side="left"
    )
    ids, mask = enc["input_ids"].to(ws.device), enc["attention_mask"].to(ws.device)
    kw = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens,
          "do_sample": False, "use_cache": True, "pad_token_id": ws.pad_id}  # fmt: skip

    def gen(model):
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        assert out.shape[1] == ids.shape[1] + args.new_tokens

    gen(ws.model), gen(one)  # warm-up
    if dnn:
        switched_off(gemm.SWITCH, lambda: gen(ws.model))()
    switched_off(fast.SWITCH, lambda: gen(ws.model))()
    g_route, g_one, g_ops, g_mkl, g_ref = [], [], [], [], []
    for _ in range(args.rounds):
        g_route.append(timed(lambda: gen(ws.model)))
        g_ref.append(timed(switched_off(fast.SWITCH, lambda: gen(ws.model))))
        if kern:
            g_ops.append(timed(switched_off(kernels.SWITCH, lambda: gen(ws.model))))
        if dnn:
            g_mkl.append(timed(switched_off(gemm.SWITCH, lambda: gen(ws.model))))
        g_one.append(timed(lambda: gen(one)))
    fusion_plans = fusion.plans()
    fusion.detach()

    n_router = sum(q.numel() for q in router_parameters(routers).values())
    _, R, D, O = next(iter(lib.modules.values())).shape
    print(
        f"setup {folder}{' (pico)' if args.pico else ''}: {len(lib)} {args.experts} experts, "
        f"{len(lib.modules)} fused modules (first: D={D}, O={O}, R={R}), {ws.dtype}, "
        f"{ws.device}, {args.threads} threads, torch {torch.__version__}"
    )
    print(f"cpu: {gemm.cpu_line()}")
    print(
        "routed layer's matrix products: "
        + ("oneDNN (lorafuse.fast.gemm)" if dnn else "torch's (MKL on CPU)")
    )
    print(
        "routed layer's elementwise work: "
        + (f"compiled kernels ({'OpenMP ' + kern.openmp if kern.openmp else 'serial'})"
           if kern else "torch ops (no kernels: not CPU, LORAFUSE_CPU_KERNELS=0 or no build)")
    )  # fmt: skip
    print(
        f"training: {len(batches)} steps x batch {args.batch_size} per round ({tokens} tokens), "
        f"AdamW; route-sgd trains {n_router} router parameters (dense softmax), plain trains "
        f"one LoRA r=4 ({sum(q.numel() for q in plain.parameters() if q.requires_grad)} "
        f"parameters); median of {args.rounds} alternating rounds"
    )
    print(
        f"generation: {ids.shape[0]} prompts x {args.new_tokens} new tokens, greedy, KV cache; "
        "routed = dense per-token route-sgd routers, vs one expert via PeftModel"
    )
    rows = [
        ("train route-sgd", tokens / statistics.median(t_route)),
        ("train single LoRA (PEFT)", tokens / statistics.median(t_plain)),
        ("generate routed", ids.shape[0] * args.new_tokens / statistics.median(g_route)),
        ("generate one PEFT adapter", ids.shape[0] * args.new_tokens / statistics.median(g_one)),
    ]
    print(f"{'variant':<28}{'tokens/s':>12}")
    for name, v in rows:
        print(f"{name:<28}{v:>12.0f}")
    train = statistics.median(p / r for r, p in zip(t_route, t_plain))
    generate = statistics.median(o / r for r, o in zip(g_route, g_one))
    print(f"training ratio route-sgd / single LoRA: {train:.2f}x (goal >= 0.9)")
    print(f"generation ratio routed / one adapter: {generate:.2f}x (goal >= 0.95)")
    first = next(iter(fusion_plans.values()))
    print(f"  plans (first layer): {first}")
    train = statistics.median(p / r for r, p in zip(t_ref, t_plain))
    generate = statistics.median(o / r for r, o in zip(g_ref, g_one))
    print(f"  with the reference forward, no plans (LORAFUSE_FAST=0): training {train:.2f}x, "
          f"generation {generate:.2f}x")  # fmt: skip
    train = statistics.median(r / p for r, p in zip(t_ref, t_route))
    generate = statistics.median(r / p for r, p in zip(g_ref, g_route))
    print(f"  plans / reference speed: training {train:.2f}x, generation {generate:.2f}x")
    if kern:
        train = statistics.median(p / r for r, p in zip(t_ops, t_plain))
        generate = statistics.median(o / r for r, o in zip(g_ops, g_one))
        print(f"  with torch ops only (kernels off): training {train:.2f}x, "
              f"generation {generate:.2f}x")  # fmt: skip
    if dnn:
        train = statistics.median(p / r for r, p in zip(t_mkl, t_plain))
        generate = statistics.median(o / r for r, o in zip(g_mkl, g_one))
        print(f"  with torch's products, as PEFT (LORAFUSE_ONEDNN=0): training {train:.2f}x, "
              f"generation {generate:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
