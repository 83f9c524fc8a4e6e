"""The build's closing check: test loss of the base model, each task's own expert
(the oracle), the shared expert and the uniform merge of the private experts.

Written to `evaluation.json` in the build folder; the per-task numbers let a user see
that experts help and that fusion matters (the uniform merge is far from the oracle).
It runs the same methods and evaluation protocol as `lorafuse eval`.
"""

from __future__ import annotations

from pathlib import Path

EVALUATION = "evaluation.json"
METHODS = {"base": "base", "oracle": "oracle", "uniform_merge": "merge-uniform", "shared": "shared"}


def evaluate_build(root: Path, tasks: list[str], settings, report=None) -> dict:
    """Per-task test NLL of base, private oracle, shared expert and uniform merge.

    Returns the summary {method: {"mean": ..., "se": ...}} (also stored, with the
    per-task losses, in `root/evaluation.json`).
    """
    from lorafuse.io import write_json
    from lorafuse.methods.run import evaluate_method
    from lorafuse.spec import load_spec
    from lorafuse.workspace import Workspace

    report = report or (lambda stage, done, total: None)
    spec = load_spec(root).model_copy(update={"tasks": list(tasks)})
    spec = spec.model_copy(update={"batch_size": settings.eval_batch_size})
    ws = Workspace(spec)
    summary, losses = {}, {}
    for i, (key, method) in enumerate(METHODS.items(), 1):
        r = evaluate_method(ws, method, "test", kind="private")
        summary[key] = {"mean": round(r.mean, 5), "se": round(r.se, 5)}
        losses[key] = {t: v["loss"] for t, v in r.per_task.items()}
        report("evaluate", i, len(METHODS))
    write_json(root / EVALUATION, {"split": "test", "summary": summary, "per_task": losses})
    return {"summary": summary}
