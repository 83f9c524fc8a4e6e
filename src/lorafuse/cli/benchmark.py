"""`lorafuse benchmark build` and `lorafuse train-expert`."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafuse.cli import options as opt
from lorafuse.cli.common import (
    console,
    err_console,
    parse_names,
    seed_everything,
    styled,
    user_errors,
)

benchmark_app = typer.Typer(
    help="The built-in benchmark: a Flan-like task suite, a base model and trained experts.",
    no_args_is_help=True,
)


def build(
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder of the build (resumed if it exists)."
    ),
    preset: str = typer.Option(
        "small",
        help="tiny (8 tasks), small (32) or full (256), Flan-like (experts transfer); "
        "tiny-interference or small-interference: every task its own skill.",
    ),
    seed: int = opt.seed(help="Random seed: same seed, same data, models and numbers."),
    threads: int = opt.count(None, help="torch CPU threads (default: the preset's, 2)."),
    evaluate: bool = typer.Option(True, help="Finish with the test-loss check (evaluation.json)."),
    force: bool = typer.Option(False, help="Delete an earlier build in --out and start over."),
) -> None:
    """Build data, base model, private, shared and cluster (MBC) experts; resumable."""
    with user_errors():
        seed_everything(seed)
        from lorafuse.benchmark.build import STAGES, UNITS, build, preset_settings
        from lorafuse.cli.progress import Stages

        _quiet_transformers()
        settings = preset_settings(preset)
        if threads is not None:
            settings.threads = threads
        _warn_if_busy(settings.threads)
        with Stages() as stages:
            stages.plan([f"build {s}" for s in STAGES if evaluate or s != "evaluate"])

            def on_stage(stage: str, event: str) -> None:
                if event == "start":
                    stages.start(f"build {stage}", None, UNITS.get(stage, ""))
                elif event == "done":
                    stages.finish()
                else:
                    stages.kept(f"build {stage}")

            def report(stage: str, done: int, total: int) -> None:
                if stages.stage == f"build {stage}":
                    stages.update(done, total)

            manifest = build(
                out, preset, seed, force, settings, report, evaluate=evaluate, on_stage=on_stage
            )
        _summary(out, manifest)


def _warn_if_busy(threads: int) -> None:
    import os

    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if threads > 1 and load >= 1 and load + threads > cores:
        err_console.print(
            styled(
                "note:",
                "yellow",
                f"the CPU is busy (load {load:.1f} on {cores} cores); torch with {threads} "
                "threads can run several times slower on a shared CPU. --threads 1 avoids "
                "that (its numbers may differ slightly from a build with more threads).",
            )
        )


def _quiet_transformers() -> None:
    # The CLI draws its own progress; transformers' loading bars would interleave with it.
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _summary(out: Path, manifest: dict) -> None:
    from rich.table import Table

    from lorafuse.benchmark.build import STAGES

    table = Table(title=f"benchmark {manifest['preset']} (seed {manifest['seed']}) in {out}")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage in STAGES:  # a build resumed after an upgrade may hold them out of order
        if stage in manifest["stages"]:
            table.add_row(stage, f"{manifest['stages'][stage]['seconds']:.1f}")
    console.print(table)
    summary = manifest["stages"].get("evaluate", {}).get("summary")
    if summary:
        rows = Table(title="test loss (mean over tasks +- standard error)")
        rows.add_column("method")
        rows.add_column("loss", justify="right")
        for method, s in summary.items():
            rows.add_row(method, f"{s['mean']:.4f} +- {s['se']:.4f}")
        console.print(rows)
    structure = manifest["stages"].get("structure")
    if structure:
        kinds = {**structure.get("kinds", {})}
        kinds.update(manifest["stages"].get("offtask", {}).get("kinds", {}))
        _structure(structure, kinds)
    mbc = manifest["stages"].get("mbc")
    if mbc:
        console.print(
            f"{len(mbc['clusters'])} MBC clusters of the private experts, adjusted Rand index "
            f"{mbc['adjusted_rand_index']:.3f} against the task families (clusters.json):",
            highlight=False,
        )
        for c in mbc["clusters"]:
            console.print(f"  {c['name']}: {', '.join(c['tasks'])}", highlight=False)
    from lorafuse.benchmark.build import training_budget

    budget = training_budget(manifest)
    if budget:
        console.print(
            "training examples per task: "
            + "; ".join(
                f"{k} {b['examples_per_task']:g} ({b['steps']:g} steps)" for k, b in budget.items()
            )
            + (
                f"; {budget['private']['replay']:.0%} of each batch replayed"
                if budget.get("private", {}).get("replay")
                else ""
            ),
            highlight=False,
        )
    n = len(manifest["tasks"])
    console.print(f"{n} tasks, {len(manifest['experts'])} experts -> {out}/manifest.json")


def _off_task(s: dict, kinds: dict) -> str:
    # Each kind's off-task ratio; the private experts' against the forget-little range.
    lo, hi = s.get("target_ranges", {}).get("off_task_ratio", (None, None))
    parts = []
    for kind, k in kinds.items():
        if k.get("ratio") is None:
            continue
        text = f"{kind} {k['ratio']:.2f} ({k['off_task_loss']:.3f} vs {k['base_loss']:.3f})"
        if kind == "private" and hi is not None:
            text += f", {'within' if k['ratio'] <= hi else 'above'} {hi:.2f} (forgets little)"
        parts.append(text)
    return "; ".join(parts) or "not measured (a build made before this statistic)"


def _structure(s: dict, kinds: dict) -> None:
    # How much the experts transfer, against the target ranges and the paper.
    from rich.markup import escape

    def share(key: str, count: str) -> str:
        lo, hi = s["target_ranges"][key]
        mark = "in" if s["in_range"][key] else "OUTSIDE"
        value = "-" if s[key] is None else f"{s[key]:.0%}"
        return (
            f"{s[count] if s[count] is not None else 'not reached'} of {s['experts']} "
            f"({value}; {mark} the target {lo:.0%}-{hi:.0%}, paper {s['paper'][key]:.0%})"
        )

    not_best = share("not_best_share", "not_best_on_own_task")
    greedy = share("greedy_share", "greedy_experts")
    console.print(
        "structure of the experts (full validation split, structure.json):\n"
        f"  not the best expert on their own task: {not_best}\n"
        f"  greedy selection recovers the private oracle with: {greedy}\n"
        f"  off-task loss / base model's: {_off_task(s, kinds)}",
        highlight=False,
    )
    if s.get("not_best_experts"):
        console.print("  not best on their own task: " + escape(", ".join(s["not_best_experts"])))


def train_expert(
    base: Path = typer.Option(..., help="Base model folder (model + tokenizer)."),
    data: str = typer.Option(..., help="flan-flat data: parquet/jsonl file or folder, or hub id."),
    tasks: str = typer.Option(..., help="Comma-separated task names to train on."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (a PEFT adapter)."),
    steps: int = opt.count(100, help="Optimizer steps."),
    lr: float = opt.number(3e-3, help="Peak learning rate (warm-up then cosine).", positive=True),
    rank: int = opt.count(4, help="LoRA rank r."),
    alpha: float = opt.number(16.0, help="LoRA alpha (scaling alpha / r).", positive=True),
    dropout: float = opt.probability(0.05, help="LoRA dropout."),
    batch_size: int = opt.count(16, help="Examples per step."),
    targets: str = typer.Option(
        ",".join(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
        help="Comma-separated target module names.",
    ),
    max_length: int = opt.count(
        128, help="Longest sequence (sources cut from the left).", minimum=9
    ),
    max_per_task: int = opt.count(None, help="Use at most this many examples per task."),
    threads: int = opt.count(2, help="torch CPU threads."),
    device: str = opt.device("cpu", help="Where to train: cpu, cuda, cuda:1, ..."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    seed: int = opt.seed(),
) -> None:
    """Train one LoRA expert on some tasks; saves a standard PEFT adapter."""
    with user_errors():
        seed_everything(seed)
        import torch

        from lorafuse.benchmark.train import ExpertSettings
        from lorafuse.benchmark.train import train_expert as run
        from lorafuse.data.flan import examples, load_flan
        from lorafuse.devices import device as resolve_device
        from lorafuse.io import check_disjoint, check_output

        check_output(out, force, kind="dir")
        resolve_device(device, "--device")
        inputs = {"--base": base}
        if Path(data).exists():
            inputs["--data"] = Path(data)
        check_disjoint({"--out": out}, inputs)
        names = parse_names(tasks, "--tasks")
        target_names = parse_names(targets, "--targets")
        settings = ExpertSettings(
            r=rank,
            alpha=alpha,
            dropout=dropout,
            lr=lr,
            steps=steps,
            batch_size=batch_size,
            warmup=min(20, max(1, steps // 5)),
            max_length=max_length,
            targets=tuple(target_names),
        )
        torch.set_num_threads(threads)
        _quiet_transformers()
        ds = load_flan(data, tasks=names, max_per_task=max_per_task, splits=("train",))
        train = examples(ds, "train", names)
        with console.status(f"training an expert on {len(names)} task(s) for {steps} steps"):
            metrics = run(base, train, names, out, settings, seed, device=device)
        console.print(f"expert -> {out} (final train loss {metrics['train_loss']:.4f})")


def register(app: typer.Typer) -> None:
    """Add `benchmark build` and `train-expert` to the CLI."""
    benchmark_app.command("build")(build)
    app.add_typer(benchmark_app, name="benchmark")
    app.command("train-expert")(train_expert)
