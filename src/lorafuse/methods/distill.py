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
from contextlib import ExitStack
from pathlib import Path

import torch
from pydantic import Field

from lorafuse.ensemble import ensemble_logprobs
from lorafuse.errors import LorafuseError
from lorafuse.evaluate import IGNORE
from lorafuse.fit.data import TrainingSet
from lorafuse.fit.options import LoopOptions
from lorafuse.fit.sgd import train
from lorafuse.formats.fits import fit_output, fit_path, load_fit
from lorafuse.formats.peft import METADATA_NAME
from lorafuse.io import atomic_dir
from lorafuse.methods.ensembles import ROWS_PER_PASS
from lorafuse.methods.fused_sgd import VALIDATION_PER_TASK, validation_loss
from lorafuse.methods.method import Context, Fitted, Method, Prepared
from lorafuse.model import attached

TEACHERS = ("ensemble-exact", "ensemble-sgd")


class DistillOptions(LoopOptions):
    """The training loop's options (2 epochs by default), one rate and the student's shape."""

    epochs: int | None = Field(
        2, ge=1, description="passes over the data (null: until a plateau, needs max_steps)"
    )
    lr: float = Field(1e-3, gt=0, description="learning rate of the student")
    rank: int = Field(4, ge=1, description="rank of the student LoRA")
    alpha: int = Field(16, ge=1, description="lora_alpha of the student")
    validation: bool = Field(True, description="validate (false: none, last weights kept)")
    validation_max_per_task: int | None = Field(
        VALIDATION_PER_TASK, ge=1, description="validation examples per task (null: all)"
    )


def teacher_weights(ws, kind: str) -> tuple[str, torch.Tensor]:
    """(name, weights (N,)) of the best fitted ensemble available, else uniform."""
    for name in TEACHERS:
        if fit_path(ws, name, kind).is_file():
            return name, torch.tensor(load_fit(ws, name, kind)["weights"])
    N = len(ws.library(kind))
    return "ensemble-uniform", torch.full((N,), 1.0 / N)


def adapter_dir(ws, kind: str) -> Path:
    """Where the distilled adapter is saved."""
    return fit_output(ws, "ensemble-distill", kind)


def fit_distill(ctx: Context) -> Fitted:
    """Train the student LoRA against the teacher ensemble; save it as a PEFT adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ws, kind, options, lib = ctx.ws, ctx.kind, ctx.options, ctx.library
    teacher_name, weights = teacher_weights(ws, kind)
    data = TrainingSet(ws, "train", options.max_examples_per_task)
    torch.manual_seed(options.seed)
    student = AutoModelForCausalLM.from_pretrained(ws.base_id, dtype=ws.dtype).to(ws.device)
    cfg = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=0.0,
        target_modules=lib.module_summary(),
        task_type="CAUSAL_LM",
    )
    student = get_peft_model(student, cfg)

    def loss_fn(idx, fusion):
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
    settings = options.settings(options.lr)
    validate = None
    if options.validation:
        cap = options.validation_max_per_task
        validate = validation_loss(ws, cap, lambda t: _logits(student, ws, t))
    with attached(ws.model, lib, "factors") as fusion:
        res = train(
            params, lambda idx: loss_fn(idx, fusion), len(data), settings, validate, None,
            ctx.progress,
        )  # fmt: skip
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(res.state[n])
    tasks = sorted({t for e in lib.experts for t in e.tasks})
    with atomic_dir(adapter_dir(ws, kind), force=True) as tmp:
        student.save_pretrained(str(tmp))
        meta = {"tasks": tasks, "distilled_from": lib.names, "teacher": teacher_name}
        (tmp / METADATA_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    summary = {
        "adapter": str(adapter_dir(ws, kind)),
        "experts_order": lib.names,
        **res.summary(),
    }
    detail = {
        "teacher": teacher_name,
        "teacher_weights": weights.tolist(),
        "settings": dict(vars(settings)),
    }
    return Fitted(summary, detail)


def _logits(student, ws, tensors) -> torch.Tensor:
    return student(
        input_ids=tensors["input_ids"].to(ws.device),
        attention_mask=tensors["attention_mask"].to(ws.device),
    ).logits  # (B, T, V)


def prepare_distill(ctx: Context) -> Prepared:
    from lorafuse.library import ExpertLibrary

    ws = ctx.ws
    fit = load_fit(ws, "ensemble-distill", ctx.kind)
    folder = Path(fit["adapter"])
    if not folder.is_dir():
        raise LorafuseError(
            f"the distilled adapter {folder} is missing; fit ensemble-distill again"
        )
    student = ExpertLibrary.load([folder], base_model=ws.base_id)
    with ExitStack() as stack:
        stack.enter_context(attached(ws.model, student, "factors")).set_expert(0)
        return Prepared(
            lambda batch: ws.logits(batch.tensors),
            stack.pop_all().close,
            info={"experts": ctx.kind, "teacher": fit["teacher"]},
        )


METHODS = (
    Method(
        "ensemble-distill",
        "ensembling",
        "one LoRA distilled from the fitted ensemble (one forward pass)",
        prepare_distill,
        options=DistillOptions,
        fit=fit_distill,
        paper=("fig2",),
    ),
)
