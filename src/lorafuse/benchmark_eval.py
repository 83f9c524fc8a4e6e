"""The build's closing check: test loss of the base model, each task's own expert
(the oracle), the shared expert and the uniform merge of the private experts.

Written to `evaluation.json` in the build folder; the per-task numbers let a user see
that experts help and that fusion matters (the uniform merge is far from the oracle).
"""

from __future__ import annotations

from pathlib import Path

EVALUATION = "evaluation.json"


def evaluate_build(root: Path, tasks: list[str], settings, report=None) -> dict:
    """Per-task test NLL of base, private oracle, shared expert and uniform merge.

    Returns the summary {method: {"mean": ..., "se": ...}} (also stored, with the
    per-task losses, in `root/evaluation.json`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafuse.data.flan import examples, load_flan
    from lorafuse.io import write_json
    from lorafuse.library import ExpertLibrary
    from lorafuse.model import attach
    from lorafuse.nll import summarize, task_losses

    report = report or (lambda stage, done, total: None)
    test = examples(load_flan(root / "data", tasks=tasks, splits=("test",)), "test", tasks)
    tokenizer = AutoTokenizer.from_pretrained(str(root / "base"))
    model = AutoModelForCausalLM.from_pretrained(str(root / "base")).eval()
    kw = {"batch_size": settings.eval_batch_size, "max_length": settings.base.max_length}
    losses = {"base": task_losses(model, tokenizer, test, **kw)}
    report("evaluate", 1, 4)
    private = ExpertLibrary.load([root / "experts" / "private"])
    owner = {t: e.name for e in private.experts for t in e.tasks}
    fusion = attach(model, private, "factors")
    losses["oracle"] = task_losses(
        model, tokenizer, test, before_task=lambda t: fusion.set_expert(owner[t]), **kw
    )
    report("evaluate", 2, 4)
    fusion.set_coefficients(None)
    fusion.set_mixer(_uniform(len(private)))
    losses["uniform_merge"] = task_losses(model, tokenizer, test, **kw)
    report("evaluate", 3, 4)
    fusion.detach()
    shared = attach(model, ExpertLibrary.load([root / "experts" / "shared"]), "factors")
    shared.set_expert(0)
    losses["shared"] = task_losses(model, tokenizer, test, **kw)
    shared.detach()
    report("evaluate", 4, 4)
    summary = {}
    for method, per_task in losses.items():
        mean, se = summarize(per_task)
        summary[method] = {"mean": round(mean, 5), "se": round(se, 5)}
    write_json(root / EVALUATION, {"split": "test", "summary": summary, "per_task": losses})
    return {"summary": summary}


def _uniform(n: int):
    from lorafuse.mixers.static import Uniform

    return Uniform(n)
