"""ensemble-distill: one new LoRA trained to match the fitted ensemble (Section 3.2.2).

The teacher is the ensemble the option `teacher` names: ensemble-sgd by default (the
paper distils "the best-performing ensemble from Section 3.2.1", the SGD one), or
ensemble-exact, both read from their saved fit (fitted first: a study fits it before the
student, `Method.needs_fit`), or ensemble-uniform. The student is a fresh PEFT LoRA on
the base model trained with the shared loop to minimise KL(teacher || student) on the
target positions, averaged by the fits' `objective`, with the options of every SGD fit:
one run per rate of the lr grid from the same initialisation, early stopping included.
Its validation loss is the student's own: the evaluation's metric on the capped
validation subset (one pass of the student, no teacher); the rate whose best student has
the lowest one wins, and every rate's run is recorded. It is saved as a standard PEFT
adapter; at inference it is one expert, one forward pass.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Literal, get_args

import torch
from pydantic import Field

from lorafuse.ensemble import ensemble_logprobs
from lorafuse.errors import LorafuseError
from lorafuse.evaluate import IGNORE
from lorafuse.fit.data import TrainingSet
from lorafuse.fit.options import GridOptions
from lorafuse.fit.sgd import search_lr, train
from lorafuse.formats.fits import fit_output, fit_path, load_fit
from lorafuse.formats.peft import METADATA_NAME
from lorafuse.io import atomic_dir
from lorafuse.methods.ensembles import ROWS_PER_PASS
from lorafuse.methods.fused_sgd import VALIDATION_PER_TASK, validation_loss
from lorafuse.methods.method import Context, Fitted, Method, Prepared
from lorafuse.model import attached
from lorafuse.parallel import once

Teacher = Literal["ensemble-sgd", "ensemble-exact", "ensemble-uniform"]
TEACHERS: tuple[str, ...] = get_args(Teacher)


class DistillOptions(GridOptions):
    """Every SGD fit's options (the lr grid chosen on validation included), the teacher
    and the student's shape."""

    teacher: Teacher = Field(
        "ensemble-sgd",
        description="the ensemble distilled: ensemble-sgd (the paper's), ensemble-exact (both "
        "fitted first) or ensemble-uniform",
    )
    rank: int = Field(4, ge=1, description="rank of the student LoRA")
    alpha: int = Field(16, ge=1, description="lora_alpha of the student")
    validation: bool = Field(True, description="validate (false: none, last weights kept)")
    validation_max_per_task: int | None = Field(
        VALIDATION_PER_TASK, ge=1, description="validation examples per task (null: all)"
    )


def teacher_fit(options: DistillOptions) -> str | None:
    """The method whose fit the student reads (None for the uniform teacher)."""
    return None if options.teacher == "ensemble-uniform" else options.teacher


def teacher_weights(ws, kind: str, teacher: str = "ensemble-sgd") -> torch.Tensor:
    """The teacher ensemble's weights (N,): the saved fit of `teacher` over the `kind`
    experts, or 1/N for ensemble-uniform. Raises LorafuseError naming the teacher and the
    fix when its fit is missing or was made for other experts."""
    N = len(ws.library(kind))
    if teacher == "ensemble-uniform":
        return torch.full((N,), 1.0 / N)
    path = fit_path(ws, teacher, kind)
    if not path.is_file():
        raise LorafuseError(
            f"ensemble-distill distils the fitted {teacher} over the {kind} experts, but it "
            f"has not been fitted ({path} is missing): fit {teacher} first (`lorafuse fit "
            f"--method {teacher} --experts {kind}`; in a study, list {teacher} with the same "
            f"experts), or set ensemble-distill's option teacher to another of {TEACHERS}"
        )
    return torch.tensor(load_fit(ws, teacher, kind, need=("weights",))["weights"])


def adapter_dir(ws, kind: str) -> Path:
    """Where the distilled adapter is saved."""
    return fit_output(ws, "ensemble-distill", kind)


def fit_distill(ctx: Context) -> Fitted:
    """Train the student LoRA against the teacher ensemble, once per rate of the lr grid
    from the same initialisation; keep the run with the lowest validation loss (the
    student's own, the evaluation's metric) and save it as a PEFT adapter.

    Raises LorafuseError when the teacher's fit is missing (`teacher_weights`).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ws, kind, options, lib = ctx.ws, ctx.kind, ctx.options, ctx.library
    weights = teacher_weights(ws, kind, options.teacher)  # (N,)
    data = TrainingSet(ws, "train", options.max_examples_per_task, options.objective)
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
    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    init = {n: p.detach().clone() for n, p in params.items()}  # every rate starts here

    def loss_fn(idx, fusion):
        t = data.batch(idx)
        teacher = ensemble_logprobs(ws.model, fusion, t, weights, "probs", ROWS_PER_PASS)
        logq = torch.log_softmax(_logits(student, ws, t).float(), -1)  # (B, T, V)
        mask = (t["labels"][:, 1:] != IGNORE).float()  # (B, T-1): positions predicting targets
        p = teacher[:, :-1].exp()  # (B, T-1, V)
        kl = (p * (teacher[:, :-1] - logq[:, :-1])).sum(-1)  # (B, T-1)
        return data.objective(idx, (kl * mask).sum(1), mask.sum(1))  # sums, counts (B,)

    validate = None
    if options.validation:
        cap = options.validation_max_per_task
        validate = validation_loss(ws, cap, lambda t: _logits(student, ws, t))
    with attached(ws.model, lib, "factors") as fusion:

        def run(lr: float):
            _load(params, init)
            return train(
                params, lambda idx: loss_fn(idx, fusion), len(data), options.settings(lr),
                validate, None, ctx.progress,
            )  # fmt: skip

        lr, res, runs = search_lr(options.grid(), run)
    _load(params, res.state)
    tasks = sorted({t for e in lib.experts for t in e.tasks})
    meta = {"tasks": tasks, "distilled_from": lib.names, "teacher": options.teacher}
    once(lambda: _save_student(student, adapter_dir(ws, kind), meta))  # the main process
    summary = {
        "adapter": str(adapter_dir(ws, kind)),
        "experts_order": lib.names,
        "teacher": options.teacher,
        "lr": lr,
        **res.summary(),
        "runs": runs,
    }
    detail = {
        "teacher_weights": weights.tolist(),
        "settings": dict(vars(options.settings(lr))),
    }
    return Fitted(summary, detail)


def _save_student(student, out: Path, meta: dict) -> None:
    with atomic_dir(out, force=True) as tmp:
        student.save_pretrained(str(tmp))
        (tmp / METADATA_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def _load(params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def _logits(student, ws, tensors) -> torch.Tensor:
    return student(
        input_ids=tensors["input_ids"].to(ws.device),
        attention_mask=tensors["attention_mask"].to(ws.device),
    ).logits  # (B, T, V)


def prepare_distill(ctx: Context) -> Prepared:
    from lorafuse.library import ExpertLibrary

    ws = ctx.ws
    fit = load_fit(ws, "ensemble-distill", ctx.kind, need=("adapter", "teacher"))
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
        needs_fit=teacher_fit,
        paper=("fig2",),
    ),
)
