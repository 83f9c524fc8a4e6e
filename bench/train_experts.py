"""Training N LoRA experts: batched in one model (lorafuse) vs one at a time with PEFT.

Prints, from ONE run, the wall time to train and save N experts each way on the
benchmark's base model size, and the speed-up of the batched trainer. Every way trains
the same experts (same data, same init, same settings) and saves standard PEFT adapters.

    python bench/train_experts.py [--experts 8] [--steps 40] [--batch-size 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def setup(root: Path, experts: int, seed: int):
    """A randomly initialised benchmark-size base model and the small suite's train data."""
    from lorafuse.benchmark.pretrain import BaseSettings, build_model
    from lorafuse.data.synthetic import generate, make_tasks
    from lorafuse.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    build_model(BaseSettings(), tok, seed).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    tasks = make_tasks("small")[:experts]
    train: dict[str, list[tuple[str, str]]] = {}
    for r in generate(tasks, 200, seed):
        if r["split"] == "train":
            train.setdefault(r["task_name"], []).append((r["source"], r["target"]))
    return root / "base", train


def peft_one_at_a_time(base_dir, train, jobs, settings, seed) -> None:
    """Each expert alone: a PEFT model, the transformers loss, AdamW, save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafuse.benchmark.train import Sampler, stable_seed
    from lorafuse.data.collate import collate, encode
    from lorafuse.fit.schedule import warmup_cosine

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    for job in jobs:
        cfg = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(settings.targets),
        )
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)), cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=settings.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(settings.warmup, settings.steps)
        )
        examples = [e for t in job.tasks for e in encode(tok, train[t])]
        sampler = Sampler(len(examples), stable_seed(seed, "data", job.name))
        model.train()
        for step in range(settings.steps):
            rows = [examples[i] for i in sampler.take(step, settings.batch_size)]
            model(**collate(rows, tok.pad_token_id, settings.max_length)).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        model.save_pretrained(str(job.out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import peft  # noqa: F401  (import cost paid before timing)

    from lorafuse.benchmark.train import ExpertJob, ExpertSettings, train_experts

    settings = ExpertSettings(steps=args.steps, batch_size=args.batch_size, warmup=2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base_dir, train = setup(root, args.experts, args.seed)
        ways = ("peft one at a time", "lorafuse K=1", f"lorafuse K={args.experts}")
        times: dict[str, float] = {}
        for r in range(args.rounds):  # interleaved rounds, best of each: the CPU is shared
            for way in ways if r % 2 == 0 else ways[::-1]:
                out = root / f"{way.replace(' ', '_')}_{r}"
                jobs = [ExpertJob(t, [t], out / t) for t in train]
                start = time.perf_counter()
                if way.startswith("peft"):
                    peft_one_at_a_time(base_dir, train, jobs, settings, args.seed)
                else:
                    k = 1 if way.endswith("K=1") else args.experts
                    train_experts(base_dir, train, jobs, settings, args.seed, group_size=k)
                t = time.perf_counter() - start
                times[way] = min(times.get(way, t), t)
    ref = times["peft one at a time"]
    head = f"{args.experts} experts x {args.steps} steps x batch {args.batch_size}"
    print(f"{head}, {args.threads} threads (r={settings.r}, 7 projections, hidden 128, 4 layers)")
    for way, t in times.items():
        print(
            f"  {way:22s} {t:7.1f} s   {t / args.experts:6.2f} s/expert   speed-up {ref / t:4.2f}x"
        )


if __name__ == "__main__":
    main()
