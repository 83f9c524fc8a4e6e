"""ensemble-distill: one new LoRA trained to match the fitted ensemble (Section 3.2.2).

The teacher is the best available fitted ensemble of the experts (ensemble-exact, else
ensemble-sgd, else uniform). The student is a fresh PEFT LoRA on the base model trained
with the shared loop to minimise KL(teacher || student) on the target positions, with
the options of every SGD fit (early stopping included). Its validation loss is the
student's own: the evaluation's metric on the capped validation subset (one pass of
the student, no teacher), so the best student by that metric is kept. It is saved as a
standard PEFT adapter; at inference it is one expert, one forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lorafuse.ensemble import ensemble_logprobs
from lorafuse.errors import LorafuseError
from lorafuse.evaluate import IGNORE
from lorafuse.fit.sgd import settings_from, train
from lorafuse.formats.fits import fit_path, load_fit
from lorafuse.formats.peft import METADATA_NAME
from lorafuse.io import atomic_dir
from lorafuse.methods.ensemble_sgd import TrainingSet
from lorafuse.methods.ensembles import ROWS_PER_PASS
from lorafuse.methods.fused_sgd import VALIDATION_PER_TASK, validation_loss
from lorafuse.methods.registry import Method, Prepared, register
from lorafuse.model import attach

TEACHERS = ("ensemble-exact", "ensemble-sgd")


def teacher_weights(ws, kind: str) -> tuple[str, torch.Tensor]:
    """(name, weights (N,)) of the best fitted ensemble available, else uniform."""
    for name in TEACHERS:
        if fit_path(ws, name, kind).is_file():
            return name, torch.tensor(load_fit(ws, name, kind)["weights"])
    N = len(ws.library(kind))
    return "ensemble-uniform", torch.full((N,), 1.0 / N)


def adapter_dir(ws, kind: str) -> Path:
    """Where the distilled adapter is saved."""
    return Path(ws.fits_dir) / f"ensemble-distill__{kind}"


def fit_distill(ws, kind, arg, options) -> dict[str, Any]:
    """Train the student LoRA against the teacher ensemble; save it as a PEFT adapter.

    Options: lr (1e-3), epochs (2; null: until a plateau), rank, alpha, validation
    (False: none, last weights kept), validation_max_per_task and those of
    `fit.sgd.settings_from` (max_steps, patience, min_delta, eval_every, warmup, ...).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lib = ws.library(kind)
    teacher_name, weights = teacher_weights(ws, kind)
    data = TrainingSet(ws, "train", options.get("max_examples_per_task"))
    torch.manual_seed(options.get("seed", 0))
    student = AutoModelForCausalLM.from_pretrained(ws.base_id, dtype=ws.dtype).to(ws.device)
    cfg = LoraConfig(
        r=options.get("rank", 4),
        lora_alpha=options.get("alpha", 16),
        lora_dropout=0.0,
        target_modules=lib.module_summary(),
        task_type="CAUSAL_LM",
    )
    student = get_peft_model(student, cfg)
    fusion = attach(ws.model, lib, "factors")

    def loss_fn(idx):
        t = data.batch(idx)
        teacher = ensemble_logprobs(ws.model, fusion, t, weights, "probs", ROWS_PER_PASS)
        logq = torch.log_softmax(
            student(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits.float(),
            -1,
        )  # (B, T, V)
        mask = (t["labels"][:, 1:] != IGNORE).float()  # (B, T-1): positions predicting targets
        p = teacher[:, :-1].exp()  # (B, T-1, V)
        kl = (p * (teacher[:, :-1] - logq[:, :-1])).sum(-1)  # (B, T-1)
        per_example = (kl * mask).sum(1) / mask.sum(1)  # (B,)
        return (data.weights[list(idx)].to(kl.device) * per_example).mean()

    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    settings = settings_from(options, float(options.get("lr", 1e-3)), epochs=2)
    validate = None
    if options.get("validation", True):
        cap = options.get("validation_max_per_task", VALIDATION_PER_TASK)
        validate = validation_loss(ws, cap, lambda t: _logits(student, ws, t))
    try:
        res = train(params, loss_fn, len(data), settings, validate, None, options.get("progress"))
    finally:
        fusion.detach()
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(res.state[n])
    tasks = sorted({t for e in lib.experts for t in e.tasks})
    with atomic_dir(adapter_dir(ws, kind), force=True) as tmp:
        student.save_pretrained(str(tmp))
        meta = {"tasks": tasks, "distilled_from": lib.names, "teacher": teacher_name}
        (tmp / METADATA_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return {
        "adapter": str(adapter_dir(ws, kind)),
        "teacher": teacher_name,
        "teacher_weights": weights.tolist(),
        "experts_order": lib.names,
        **res.summary(),
        "settings": {k: v for k, v in vars(settings).items()},
    }


def _logits(student, ws, tensors) -> torch.Tensor:
    return student(
        input_ids=tensors["input_ids"].to(ws.device),
        attention_mask=tensors["attention_mask"].to(ws.device),
    ).logits  # (B, T, V)


def prepare_distill(ws, kind, arg) -> Prepared:
    from lorafuse.library import ExpertLibrary

    fit = load_fit(ws, "ensemble-distill", kind)
    folder = Path(fit["adapter"])
    if not folder.is_dir():
        raise LorafuseError(
            f"the distilled adapter {folder} is missing; fit ensemble-distill again"
        )
    fusion = attach(ws.model, ExpertLibrary.load([folder], base_model=ws.base_id), "factors")
    fusion.set_expert(0)

    return Prepared(
        lambda batch: ws.logits(batch.tensors),
        fusion.detach,
        info={"experts": kind, "teacher": fit["teacher"]},
    )


register(
    Method(
        "ensemble-distill",
        "ensembling",
        "one LoRA distilled from the fitted ensemble (one forward pass)",
        prepare_distill,
        fit=fit_distill,
    )
)
