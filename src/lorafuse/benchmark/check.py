"""The build's closing check: test loss of the base model, each task's own expert
(the oracle), each task's cluster expert (the MBC oracle, when the build has them), the
shared expert and the uniform merge of the private experts.

Written to `evaluation.json` in the build folder; the per-task numbers let a user see
that experts help and that fusion matters (the uniform merge is far from the oracle).
It runs the same methods and evaluation protocol as `lorafuse eval`.
"""

from __future__ import annotations

from pathlib import Path

EVALUATION = "evaluation.json"
# key in evaluation.json -> (method, expert kind)
METHODS = {
    "base": ("base", "private"),
    "oracle": ("oracle", "private"),
    "mbc_oracle": ("oracle", "mbc"),
    "uniform_merge": ("merge-uniform", "private"),
    "shared": ("shared", "private"),
}


def evaluate_build(root: Path, tasks: list[str], settings, report=None) -> dict:
    """Per-task test NLL of base, private oracle, MBC oracle, shared expert, uniform merge.

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
    methods = {k: m for k, m in METHODS.items() if m[1] in ws.kinds}  # mbc: newer builds
    summary, losses = {}, {}
    for i, (key, (method, kind)) in enumerate(methods.items(), 1):
        r = evaluate_method(ws, method, "test", kind=kind)
        summary[key] = {"mean": round(r.mean, 5), "se": round(r.se, 5)}
        losses[key] = {t: v["loss"] for t, v in r.per_task.items()}
        report("evaluate", i, len(methods))
    write_json(root / EVALUATION, {"split": "test", "summary": summary, "per_task": losses})
    return {"summary": summary}
