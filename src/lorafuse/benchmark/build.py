"""`lorafuse benchmark build`: data, base model, private, shared and cluster experts, a check.

Stages run in order and each writes its output under a temporary name then renames it,
so an interrupted build resumes where it stopped: finished stages are skipped, finished
experts are kept, and a half-trained group of experts is retrained from its start (its
seeds depend only on the build seed and the experts' names), giving the same result as
an uninterrupted build. `manifest.json` records the tasks, families, experts (name,
kind, path, tasks), seeds, settings and the completed stages with their durations.

The `mbc` stage clusters the private experts (MBC, `lorafuse.select.clustering`) and trains
one expert per cluster on the union of its tasks (`experts/mbc/cluster_<i>`), for the
private experts' steps per task of its cluster, so that it sees each of its tasks'
examples as often as a private expert sees its own. The clusters are saved in
`clusters.json` before training, so a resumed stage trains the same experts. The
`structure` and `offtask` stages measure the experts' structure on the full validation
split (`benchmark.structure`). `training_budget` states each kind's budget per task.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pydantic import Field

from lorafuse.benchmark.pretrain import BaseSettings
from lorafuse.benchmark.train import ExpertSettings
from lorafuse.data.errors import DataError
from lorafuse.data.synthetic import get_preset, make_tasks
from lorafuse.formats.manifest import read_manifest
from lorafuse.formats.schema import FileModel, Finite, check, read_json

MANIFEST = "manifest.json"
STAGES = ("data", "base", "private", "structure", "shared", "mbc", "offtask", "evaluate")
CLUSTERS = "clusters.json"
REPLAY_SHARE = 0.5  # design "replay": the share of an expert's batch replayed from pretraining
Progress = Callable[[str, int, int], None]
# what `on_progress` counts in each stage (the private, shared and mbc stages count one
# step of one expert as one)
UNITS = {
    "data": "",
    "base": "steps",
    "private": "expert steps",
    "structure": "expert-examples",
    "shared": "steps",
    "mbc": "expert steps",
    "offtask": "expert-examples",
    "evaluate": "methods",
}


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
    clusters: int = 8  # k of the MBC clustering behind the cluster experts
    # a cluster expert trains `expert.steps` per task of its cluster, so it sees each of its
    # tasks' examples as often as a private expert sees its own (False: `expert.steps`)
    cluster_steps_per_task: bool = True

    def __post_init__(self):
        p = get_preset(self.preset)
        n = p.families * p.tasks_per_family
        if isinstance(self.clusters, bool) or not isinstance(self.clusters, int):
            raise DataError(f"clusters={self.clusters!r} must be an integer in 1..{n}")
        if not 1 <= self.clusters <= n:
            raise DataError(
                f"clusters={self.clusters} is impossible for the {n} private experts of preset "
                f"{self.preset}; choose an integer in 1..{n}"
            )

    def to_dict(self) -> dict:
        """Plain-JSON form for the manifest."""
        d = asdict(self)
        d["expert"]["targets"] = list(self.expert.targets)
        return d


def preset_settings(preset: str) -> BuildSettings:
    """The build settings of a preset (micro, tiny, small, full; `<size>-<design>` trains
    like `<size>`, and a "replay" design replays pretraining data in `REPLAY_SHARE` of each
    expert batch); DataError if unknown."""
    p = get_preset(preset)
    size = preset.split("-")[0]
    if size == "micro":  # for tests: a few seconds end to end
        base = BaseSettings(hidden=32, layers=2, heads=2, intermediate=64, steps=20, batch_size=8)
        expert = ExpertSettings(steps=6, batch_size=4, warmup=2)
        out = BuildSettings(
            preset, base, expert, 6, group_size=2, threads=1, eval_batch_size=16, clusters=2
        )
    elif size == "tiny":
        base = BaseSettings(steps=180)
        expert = ExpertSettings(steps=30, warmup=8)
        out = BuildSettings(preset, base, expert, shared_steps=60, clusters=4)
    elif size == "small":
        out = BuildSettings(preset, BaseSettings(steps=800), ExpertSettings(), 300, clusters=8)
    else:
        out = BuildSettings(preset, BaseSettings(steps=4000), ExpertSettings(), 2000, clusters=10)
    if p.design == "replay":
        out.expert = replace(out.expert, replay=REPLAY_SHARE)
    return out


def expert_plan(root: Path, tasks: list[str], clusters: list[list[str]] | None = None) -> list:
    """The jobs of a build: one private expert per task, the shared expert, and one
    expert per cluster of tasks (`cluster_<i>`, once the clusters are known)."""
    from lorafuse.benchmark.train import ExpertJob

    jobs = [ExpertJob(t, [t], root / "experts" / "private" / t, "private") for t in tasks]
    jobs.append(ExpertJob("shared", list(tasks), root / "experts" / "shared", "shared"))
    for i, members in enumerate(clusters or []):
        name = f"cluster_{i}"
        jobs.append(ExpertJob(name, list(members), root / "experts" / "mbc" / name, "mbc"))
    return jobs


def cluster_steps(jobs: list, settings: BuildSettings) -> list:
    """The mbc jobs with their steps: `expert.steps` per task of the cluster (when
    `cluster_steps_per_task`), longest first so that equal budgets train together."""
    if not settings.cluster_steps_per_task:
        return jobs
    per_task = settings.expert.steps
    jobs = [replace(j, steps=per_task * len(j.tasks)) for j in jobs]
    return sorted(jobs, key=lambda j: -j.steps)


def training_budget(manifest: dict) -> dict[str, dict]:
    """Each expert kind's training budget from a build manifest: {kind: {"experts",
    "steps" (per expert, mean), "examples_per_task" (training rows drawn per task of an
    expert, mean), "replay" (share of each batch replayed from pretraining)}}."""
    st = manifest.get("settings", {})
    es = st.get("expert", {})
    b, replay = es.get("batch_size", 16), es.get("replay", 0.0)
    own_rows = b - round(replay * b)  # an expert's own rows per step
    per_task_steps = st.get("cluster_steps_per_task", False)
    out: dict[str, dict] = {}
    for e in manifest.get("experts", []):
        n = max(1, len(e["tasks"]))
        steps = es.get("steps", 0)
        if e["kind"] == "shared":
            steps = st.get("shared_steps", steps)
        elif e["kind"] == "mbc" and per_task_steps:
            steps *= n
        k = out.setdefault(e["kind"], {"experts": 0, "steps": 0.0, "examples_per_task": 0.0})
        k["experts"] += 1
        k["steps"] += steps
        k["examples_per_task"] += steps * own_rows / n
    for k in out.values():
        k["steps"] = round(k["steps"] / k["experts"], 1)
        k["examples_per_task"] = round(k["examples_per_task"] / k["experts"], 1)
        k["replay"] = replay
    return out


class ClusterRecord(FileModel):
    """One cluster of clusters.json: the tasks of its expert (other fields kept)."""

    tasks: list[str] = Field(min_length=1)


class ClustersFile(FileModel):
    """clusters.json as a resumed build reads it back."""

    clusters: list[ClusterRecord]
    adjusted_rand_index: Finite


def saved_clusters(root: Path) -> dict | None:
    """The build's `clusters.json` (written by the mbc stage), or None before that stage.

    Raises FileFormatError naming the file and field when it is malformed.
    """
    path = Path(root) / CLUSTERS
    if not path.is_file():
        return None
    saved = read_json(path, what="build clusters")
    check(saved, ClustersFile, path, what="build clusters")
    return saved


def _experts(root: Path, names: list[str]) -> list[dict]:
    saved = saved_clusters(root)
    clusters = [c["tasks"] for c in saved["clusters"]] if saved else None
    return [
        {"name": j.name, "kind": j.kind, "path": str(j.out.relative_to(root)), "tasks": j.tasks}
        for j in expert_plan(root, names, clusters)
    ]


def _manifest(root: Path, settings: BuildSettings, seed: int, tasks) -> dict:
    old = read_manifest(root / MANIFEST) if (root / MANIFEST).is_file() else None
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
        "experts": _experts(root, [t.name for t in tasks]),
        "eval": {"max_length": settings.base.max_length, "batch_size": settings.eval_batch_size},
        "stages": {},
    }
    if old is not None:
        # settings added after a build was made take their defaults there, so it resumes
        settings_then = _with_defaults(old.get("settings"), new["settings"])
        same = old.get("preset") == new["preset"] and old.get("seed") == new["seed"]
        same = same and settings_then == new["settings"]
        if not same:
            raise DataError(
                f"{root} holds a build with preset {old.get('preset')}, seed {old.get('seed')} "
                "or other settings; pass --force to rebuild it or choose another --out"
            )
        new["stages"] = old.get("stages", {})
    return new


def _with_defaults(old, new):
    if not isinstance(old, dict) or not isinstance(new, dict):
        return old
    missing = {k: v for k, v in new.items() if k not in old}
    return {**{k: _with_defaults(v, new.get(k)) for k, v in old.items()}, **missing}


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
    on_stage: Callable[[str, str], None] | None = None,
) -> dict:
    """Build (or resume) the benchmark of `preset` in `out`; return the manifest.

    `on_progress(stage, done, total)` reports progress within a stage (in `UNITS`);
    `on_stage(stage, event)` as a stage starts ("start") and ends ("done"), or for a stage
    an earlier run finished ("kept"); `on_expert(name)` runs after each expert is saved;
    `evaluate=False` skips the closing test-loss check. Raises DataError for an unknown
    preset or a folder holding another build (unless `force`, which rebuilds from scratch).
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
    event = on_stage or (lambda stage, what: None)
    try:
        for stage in STAGES:
            if stage in manifest["stages"] or (stage == "evaluate" and not evaluate):
                if stage in manifest["stages"]:
                    event(stage, "kept")
                report(stage, 1, 1)
                continue
            event(stage, "start")
            start = time.perf_counter()
            info = _run_stage(stage, root, settings, seed, tasks, report, on_expert)
            manifest["stages"][stage] = {"seconds": round(time.perf_counter() - start, 2), **info}
            manifest["experts"] = _experts(root, [t.name for t in tasks])
            write_json(root / MANIFEST, manifest)
            event(stage, "done")
    finally:
        torch.set_num_threads(threads)
    return manifest


def _run_stage(stage, root, settings, seed, tasks, report, on_expert) -> dict:
    from lorafuse.benchmark.pretrain import pretrain
    from lorafuse.data.flan import write_flan
    from lorafuse.data.synthetic import generate

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
            on_step=lambda done, loss: report(stage, done, steps),
        )
        return {"final_loss": round(info["final_loss"], 4)}
    if stage in ("private", "shared"):
        jobs = [j for j in expert_plan(root, names) if j.kind == stage]
        es = settings.expert
        if stage == "shared":
            es = ExpertSettings(**{**asdict(es), "steps": settings.shared_steps})
        _train(stage, root, jobs, es, settings, seed, report, on_expert)
        return {"experts": len(jobs)}
    if stage == "structure":
        from lorafuse.benchmark.structure import measure_structure

        return measure_structure(root, names, settings, report)
    if stage == "mbc":
        saved = saved_clusters(root) or _cluster(root, settings, seed, tasks)
        jobs = expert_plan(root, names, [c["tasks"] for c in saved["clusters"]])
        jobs = cluster_steps([j for j in jobs if j.kind == "mbc"], settings)
        _train(stage, root, jobs, settings.expert, settings, seed, report, on_expert)
        ari = saved["adjusted_rand_index"]
        return {"experts": len(jobs), "adjusted_rand_index": ari, "clusters": saved["clusters"]}
    if stage == "offtask":  # the cluster experts' off-task ratio, beside the private one
        from lorafuse.benchmark.structure import measure_kind

        return {"kinds": {"mbc": measure_kind(root, names, settings, "mbc", report)}}
    from lorafuse.benchmark.check import evaluate_build

    return evaluate_build(root, names, settings, report)


def _train(stage, root, jobs, es, settings, seed, report, on_expert) -> None:
    from lorafuse.benchmark.train import job_groups, train_experts
    from lorafuse.data.flan import examples, load_flan

    names = sorted({t for j in jobs for t in j.tasks})
    train = examples(load_flan(root / "data", tasks=names, splits=("train",)), "train", names)
    total, done = sum(j.steps or es.steps for j in jobs), [0]
    size = {g[0].name: len(g) for g in job_groups(jobs, settings.group_size, es.steps)}

    def step(name: str, _i: int) -> None:  # name: the group's first expert
        done[0] += size.get(name, 1)
        report(stage, min(done[0], total), total)

    def saved(job, _metrics) -> None:
        if on_expert is not None:
            on_expert(job.name)

    replay = None
    if es.replay > 0:  # the base model's own pretraining data, as it saw it
        from lorafuse.data.synthetic import pretraining_examples

        b = settings.base
        families = get_preset(settings.preset).families
        replay = pretraining_examples(families, b.steps * b.batch_size, seed, b.shuffled)
    report(stage, 0, total)
    train_experts(
        root / "base", train, jobs, es, seed, settings.group_size, step, saved, replay=replay
    )
    report(stage, total, total)


def _cluster(root: Path, settings: BuildSettings, seed: int, tasks) -> dict:
    """MBC clusters of the private experts -> clusters.json (`lorafuse cluster` and the
    study draw the heat map)."""
    from sklearn.metrics import adjusted_rand_score

    from lorafuse.io import write_json
    from lorafuse.library import ExpertLibrary
    from lorafuse.select.clustering import mbc_cluster

    lib = ExpertLibrary.load([root / "experts" / "private"])
    result = mbc_cluster(lib, k=settings.clusters, seed=seed)
    family = {t.name: t.family.name for t in tasks}
    truth = [family[e.tasks[0]] for e in lib.experts]  # each private expert has one task
    clusters = [
        {
            "cluster": c,
            "name": f"cluster_{c}",
            "experts": [lib.names[i] for i in members],
            "tasks": [t for i in members for t in lib.experts[i].tasks],
            "families": sorted({truth[i] for i in members}),
        }
        for c, members in enumerate(result.clusters)
    ]
    ari = round(float(adjusted_rand_score(truth, result.labels)), 4)
    saved = {
        "k": settings.clusters,
        "experts_kind": "private",
        "seed": seed,
        "adjusted_rand_index": ari,
        "clusters": clusters,
    }
    write_json(root / CLUSTERS, saved)  # last: its presence marks the clustering as done
    return saved
