"""Expert x task matrix: lorafuse's batched forward vs one PEFT adapter after another.

Both compute every expert's per-example NLL on the same batches; the script checks they
agree, then prints tokens/s of each and the ratio, from ONE run.

    python bench/matrix.py --library runs/small [--experts private] [--split validation]
"""

from __future__ import annotations

import argparse
import time

import torch


def peft_one_by_one(ws, kind: str, batches) -> torch.Tensor:
    """(N, M) per-example NLL: load each expert with PEFT, run all batches, unload."""
    from peft import PeftModel

    from lorafuse.evaluate import target_nll

    lib = ws.library(kind)
    out = torch.empty(len(lib), sum(len(b.tasks) for b in batches))
    for i, expert in enumerate(lib.experts):
        model = PeftModel.from_pretrained(ws.model, str(expert.path)).eval()
        r0 = 0
        with torch.inference_mode():
            for b in batches:
                t = {k: v.to(ws.device) for k, v in b.tensors.items()}
                logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
                s, c = target_nll(logits, t["labels"])
                out[i, r0 : r0 + len(s)] = (s / c).cpu()
                r0 += len(s)
        model.unload()  # restores the base model's modules for the next expert
    return out


def main() -> None:
    from lorafuse.matrix import example_losses
    from lorafuse.spec import load_spec
    from lorafuse.workspace import Workspace

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", default="runs/small")
    p.add_argument("--experts", default="private")
    p.add_argument("--split", default="validation")
    p.add_argument("--max-examples-per-task", type=int, default=20)
    p.add_argument("--rows-per-pass", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    ws = Workspace(load_spec(args.library))
    batches = ws.batches(args.split, args.max_examples_per_task)
    N = len(ws.library(args.experts))
    tokens = N * sum(int(b.tensors["attention_mask"].sum()) for b in batches)
    _ = ws.model  # load once, outside the timings

    t0 = time.perf_counter()
    ours, _ = example_losses(
        ws, args.experts, args.split, args.max_examples_per_task, args.rows_per_pass
    )
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = peft_one_by_one(ws, args.experts, batches)
    t_peft = time.perf_counter() - t0
    err = (ours - theirs).abs().max().item()
    rows = sum(len(b.tasks) for b in batches)
    print(
        f"{N} {args.experts} experts x {rows} {args.split} examples ({len(ws.tasks)} tasks, "
        f"<= {args.max_examples_per_task}/task), {tokens} tokens in all, batch "
        f"{ws.spec.batch_size}, rows/pass {args.rows_per_pass}, {args.threads} threads, "
        f"{ws.dtype}; max |diff| {err:.2e}"
    )
    print(f"{'way':<28}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'lorafuse batched matrix':<28}{t_ours:>10.2f}{tokens / t_ours:>12.0f}")
    print(f"{'PEFT, one expert at a time':<28}{t_peft:>10.2f}{tokens / t_peft:>12.0f}")
    print(f"ratio (batched / PEFT tokens/s): {t_peft / t_ours:.2f}x")


if __name__ == "__main__":
    main()
