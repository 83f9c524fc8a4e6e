"""Independent reference: per-example NLL one example at a time, no batching or padding."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafuse.data.flan import examples, load_flan


def reference_task_losses(bench, split, expert_dir=None, tasks=None) -> dict[str, float]:
    """{task: mean over examples of the mean target-token NLL}, via plain PEFT."""
    tok = AutoTokenizer.from_pretrained(bench / "base")
    model = AutoModelForCausalLM.from_pretrained(bench / "base").eval()
    if expert_dir is not None:
        model = PeftModel.from_pretrained(model, expert_dir).eval()
    data = examples(load_flan(bench / "data"), split)
    out = {}
    for task, pairs in data.items():
        if tasks is not None and task not in tasks:
            continue
        losses = []
        for source, target in pairs:
            s = tok(source, add_special_tokens=False)["input_ids"]
            t = tok(" " + target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([s + t])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            nll = [-logp[len(s) - 1 + j, t[j]].item() for j in range(len(t))]
            losses.append(sum(nll) / len(nll))
        out[task] = sum(losses) / len(losses)
    return out
