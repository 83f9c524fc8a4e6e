"""`lorafuse study`: the paper's whole comparison on one library, with a report."""

from __future__ import annotations

import contextlib
from collections import Counter
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
from lorafuse.parallel import is_main_process


def study_command(
    preset: str = typer.Option(
        None, help="A shipped study: micro, tiny, small, full or small-interference."
    ),
    config: Path = typer.Option(None, help="A study config (YAML) instead of a preset."),
    out: Path = typer.Option(Path("runs/study"), "--out", "-o", help="The study's folder."),
    methods: str = typer.Option(None, help="Comma-separated subset of the config's methods."),
    max_examples_per_task: int = opt.count(None, help="Cap every stage's examples per task."),
    device: str = opt.device(None, help="cpu, cuda, ... (default: the config's)."),
    dtype: str = opt.dtype(None, help="fp32 or bf16 (default: the config's)."),
    seed: int = opt.seed(
        None, help="Random seed: the build's, and the fits' without seeds (default: config's, 0)."
    ),
    seeds: str = typer.Option(
        None, help="Comma-separated fit seeds, e.g. 0,1,2: fits and evaluations once per seed."
    ),
) -> None:
    """Build (if asked), fit and evaluate every method, analyse, and write the report.

    Stages are cached in the output folder: an interrupted study resumes, and a finished
    one re-renders its report in seconds. With --seeds the benchmark is built once (from
    --seed) and every method is fitted and evaluated with each seed; the claims table
    then shows each seed's verdict and a robust one.
    """
    with user_errors():
        from lorafuse.errors import LorafuseError
        from lorafuse.study.config import load_config, preset_config, with_seeds

        if (preset is None) == (config is None):
            raise LorafuseError("give either --preset (micro, tiny, small, ...) or --config")
        cfg = preset_config(preset) if preset else load_config(config)
        updates = {"device": device, "dtype": dtype, "seed": seed}
        cfg = cfg.model_copy(update={k: v for k, v in updates.items() if v is not None})
        if seeds is not None:
            cfg = with_seeds(cfg, _seeds(seeds))
        seed_everything(cfg.seed)
        _quiet_transformers()
        from lorafuse.cli.progress import Stages
        from lorafuse.study.console import summary_table
        from lorafuse.study.headline import headline
        from lorafuse.study.runner import StudyRun, run_study
        from lorafuse.study.stages import Progress

        names = parse_names(methods, "--methods")
        main = is_main_process()  # under accelerate launch every process runs, one speaks
        with Stages() if main else contextlib.nullcontext(Progress()) as bar:
            run = StudyRun(cfg, out, names, max_examples_per_task, bar)
            results = run_study(run)
        if not main:
            return
        console.print(summary_table(results))
        for line in headline(results):
            console.print(line, highlight=False)
        if robust := results.get("robust_claims"):
            counts = Counter(r["verdict"] for r in robust)
            line = ", ".join(f"{v}: {n}" for v, n in counts.items())
            console.print(f"robust claims over {len(results['seeds'])} seeds: {line}")
        failed = [m["name"] for m in results["methods"] if m.get("status") == "failed"]
        if failed:
            err_console.print(
                styled("failed methods (see results.json):", "yellow", ", ".join(failed))
            )
        console.print(f"report: {out / 'report.md'} and {out / 'report.html'}", highlight=False)


def _seeds(text: str) -> list[int]:
    from lorafuse.cli.options import SEED_MAX
    from lorafuse.errors import LorafuseError

    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise LorafuseError(f"--seeds must be comma-separated integers; got {text!r}") from None
    bad = [s for s in seeds if not 0 <= s <= SEED_MAX]
    if bad or not seeds:
        raise LorafuseError(f"--seeds must be whole numbers in [0, {SEED_MAX}]; got {text!r}")
    return seeds


def _quiet_transformers() -> None:
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def register(app: typer.Typer) -> None:
    """Add `study` to the CLI."""
    app.command("study")(study_command)
