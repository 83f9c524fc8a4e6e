"""`lorafuse benchmark build`: data, base model, private and shared experts, a check.

Stages run in order and each writes its output under a temporary name then renames it,
so an interrupted build resumes where it stopped: finished stages are skipped, finished
experts are kept, and a half-trained group of experts is retrained from its start (its
seeds depend only on the build seed and the experts' names), giving the same result as
an uninterrupted build. `manifest.json` records the tasks, families, experts (name,
kind, path, tasks), seeds, settings and the completed stages with their durations.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lorafuse.data.errors import DataError
from lorafuse.data.synthetic import get_preset, make_tasks
from lorafuse.pretrain import BaseSettings
from lorafuse.train import ExpertSettings

MANIFEST = "manifest.json"
STAGES = ("data", "base", "private", "shared", "evaluate")
Progress = Callable[[str, int, int], None]


@dataclass
class BuildSettings:
    """Everything a build depends on besides the seed (recorded in the manifest)."""

    preset: str
    base: BaseSettings
    expert: ExpertSettings
    shared_steps: int
    group_size: int = 8
    threads: int = 2
    eval_batch_size: int = 64

    def to_dict(self) -> dict:
        """Plain-JSON form for the manifest."""
        d = asdict(self)
        d["expert"]["targets"] = list(self.expert.targets)
        return d


def preset_settings(preset: str) -> BuildSettings:
    """The build settings of a preset (micro, tiny, small, full); DataError if unknown."""
    get_preset(preset)
    if preset == "micro":  # for tests: a few seconds end to end
        base = BaseSettings(hidden=32, layers=2, heads=2, intermediate=64, steps=20, batch_size=8)
        expert = ExpertSettings(steps=6, batch_size=4, warmup=2)
        return BuildSettings(preset, base, expert, 6, group_size=2, threads=1, eval_batch_size=16)
    if preset == "tiny":
        base = BaseSettings(steps=240)
        return BuildSettings(preset, base, ExpertSettings(steps=40, warmup=10), shared_steps=80)
    if preset == "small":
        return BuildSettings(preset, BaseSettings(steps=800), ExpertSettings(), shared_steps=300)
    return BuildSettings(preset, BaseSettings(steps=4000), ExpertSettings(), shared_steps=2000)


def expert_plan(root: Path, tasks: list[str]) -> list:
    """The jobs of a build: one private expert per task, then the shared expert."""
    from lorafuse.train import ExpertJob

    jobs = [ExpertJob(t, [t], root / "experts" / "private" / t, "private") for t in tasks]
    return [*jobs, ExpertJob("shared", list(tasks), root / "experts" / "shared", "shared")]


def _manifest(root: Path, settings: BuildSettings, seed: int, tasks) -> dict:
    old = json.loads((root / MANIFEST).read_text()) if (root / MANIFEST).is_file() else None
    new = {
        "format": "lorafuse-benchmark/1",
        "preset": settings.preset,
        "seed": seed,
        "seeds": {
            "data": f"random.Random('lorafuse:{seed}:<task>') per task",
            "base_init": f"torch.manual_seed({seed})",
            "base_data": f"random.Random('lorafuse-pretrain:{seed}')",
            "lora_init": f"torch.Generator().manual_seed({seed}), the same for every expert",
            "expert_batches": f"stable_seed({seed}, 'data', <expert>) per expert",
            "dropout": f"stable_seed({seed}, 'dropout', <experts of the group>) per group",
        },
        "settings": settings.to_dict(),
        "families": _families(tasks),
        "tasks": [t.describe() for t in tasks],
        "experts": [
            {"name": j.name, "kind": j.kind, "path": str(j.out.relative_to(root)), "tasks": j.tasks}
            for j in expert_plan(root, [t.name for t in tasks])
        ],
        "eval": {"max_length": settings.base.max_length, "batch_size": settings.eval_batch_size},
        "stages": {},
    }
    if old is not None:
        same = all(old.get(k) == new[k] for k in ("preset", "seed", "settings"))
        if not same:
            raise DataError(
                f"{root} holds a build with preset {old.get('preset')}, seed {old.get('seed')} "
                "or other settings; pass --force to rebuild it or choose another --out"
            )
        new["stages"] = old.get("stages", {})
    return new


def _families(tasks) -> list[dict]:
    out: dict[str, dict] = {}
    for t in tasks:
        fam = out.setdefault(
            t.family.name, {"name": t.family.name, "kind": t.family.kind, "tasks": []}
        )
        fam["tasks"].append(t.name)
    return list(out.values())


def prepare_output(out: str | Path, force: bool) -> Path:
    """Create or reuse the build folder; with `force`, remove an earlier build first.

    Raises DataError when `out` is a non-empty folder that is not a lorafuse build.
    """
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise DataError(f"--out {root} is a file; give a folder")
    if root.is_dir() and any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise DataError(f"--out {root} is a non-empty folder without {MANIFEST}; choose a new one")
    if force and root.is_dir():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    for pattern in (".*.tmp-*", ".*.old-*"):  # left by a build killed while writing
        for stale in sorted(root.rglob(pattern), reverse=True):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
    return root


def build(
    out: str | Path,
    preset: str = "small",
    seed: int = 0,
    force: bool = False,
    settings: BuildSettings | None = None,
    on_progress: Progress | None = None,
    on_expert: Callable[[str], None] | None = None,
    evaluate: bool = True,
) -> dict:
    """Build (or resume) the benchmark of `preset` in `out`; return the manifest.

    `on_progress(stage, done, total)` reports progress; `on_expert(name)` runs after each
    expert is saved; `evaluate=False` skips the closing test-loss check. Raises DataError
    for an unknown preset or a folder holding another build (unless `force`, which
    rebuilds from scratch).
    """
    import torch

    from lorafuse.io import write_json

    settings = settings or preset_settings(preset)
    tasks = make_tasks(get_preset(settings.preset))
    root = prepare_output(out, force)
    manifest = _manifest(root, settings, seed, tasks)
    write_json(root / MANIFEST, manifest)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)  # fixed, so that the same seed gives the same numbers
    report = on_progress or (lambda stage, done, total: None)
    try:
        for stage in STAGES:
            if stage in manifest["stages"] or (stage == "evaluate" and not evaluate):
                report(stage, 1, 1)
                continue
            start = time.perf_counter()
            info = _run_stage(stage, root, settings, seed, tasks, report, on_expert)
            manifest["stages"][stage] = {"seconds": round(time.perf_counter() - start, 2), **info}
            write_json(root / MANIFEST, manifest)
    finally:
        torch.set_num_threads(threads)
    return manifest


def _run_stage(stage, root, settings, seed, tasks, report, on_expert) -> dict:
    from lorafuse.data.flan import examples, load_flan, write_flan
    from lorafuse.data.synthetic import generate
    from lorafuse.pretrain import pretrain
    from lorafuse.train import train_experts

    names = [t.name for t in tasks]
    if stage == "data":
        report(stage, 0, 1)
        rows = generate(tasks, get_preset(settings.preset).examples_per_task, seed)
        write_flan(rows, root / "data", force=True)
        report(stage, 1, 1)
        return {"rows": len(rows)}
    if stage == "base":
        steps = settings.base.steps
        info = pretrain(
            root / "base",
            get_preset(settings.preset).families,
            settings.base,
            seed,
            on_step=lambda i, loss: report(stage, i + 1, steps),
        )
        return {"final_loss": round(info["final_loss"], 4)}
    if stage in ("private", "shared"):
        jobs = [j for j in expert_plan(root, names) if j.kind == stage]
        train = examples(load_flan(root / "data", tasks=names, splits=("train",)), "train", names)
        es = settings.expert
        if stage == "shared":
            es = ExpertSettings(**{**asdict(es), "steps": settings.shared_steps})
        total, done = len(jobs) * es.steps, [0]
        size = min(settings.group_size, len(jobs))

        def step(_name: str, _i: int) -> None:
            done[0] += size
            report(stage, min(done[0], total), total)

        def saved(job, _metrics) -> None:
            if on_expert is not None:
                on_expert(job.name)

        train_experts(root / "base", train, jobs, es, seed, settings.group_size, step, saved)
        report(stage, total, total)
        return {"experts": len(jobs)}
    from lorafuse.benchmark_eval import evaluate_build

    return evaluate_build(root, names, settings, report)
