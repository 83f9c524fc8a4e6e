"""`lorafuse study`: the paper's whole comparison on one library, with a report."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafuse.cli.common import console, err_console, seed_everything, user_errors


def study_command(
    preset: str = typer.Option(None, help="A shipped study: micro, tiny, small or full."),
    config: Path = typer.Option(None, help="A study config (YAML) instead of a preset."),
    out: Path = typer.Option(Path("runs/study"), "--out", "-o", help="The study's folder."),
    methods: str = typer.Option(None, help="Comma-separated subset of the config's methods."),
    max_examples_per_task: int = typer.Option(None, help="Cap every stage's examples per task."),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: the config's)."),
    dtype: str = typer.Option(None, help="fp32 or bf16 (default: the config's)."),
    seed: int = typer.Option(None, help="Random seed (default: the config's, 0)."),
) -> None:
    """Build (if asked), fit and evaluate every method, analyse, and write the report.

    Stages are cached in the output folder: an interrupted study resumes, and a finished
    one re-renders its report in seconds.
    """
    with user_errors():
        from lorafuse.errors import LorafuseError
        from lorafuse.study.config import load_config, preset_config

        if (preset is None) == (config is None):
            raise LorafuseError("give either --preset (micro, tiny, small, full) or --config")
        cfg = preset_config(preset) if preset else load_config(config)
        updates = {"device": device, "dtype": dtype, "seed": seed}
        cfg = cfg.model_copy(update={k: v for k, v in updates.items() if v is not None})
        seed_everything(cfg.seed)
        _quiet_transformers()
        from lorafuse.study.console import summary_table
        from lorafuse.study.runner import StudyRun, run_study

        names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
        with _Bars() as bar:
            run = StudyRun(cfg, out, names, max_examples_per_task, bar)
            results = run_study(run)
        console.print(summary_table(results))
        failed = [m["name"] for m in results["methods"] if m.get("status") == "failed"]
        if failed:
            err_console.print(f"[yellow]failed methods (see results.json):[/] {failed}")
        console.print(f"report: {out / 'report.md'} and {out / 'report.html'}")


class _Bars:
    """rich bars for the study: one overall, one for the current stage."""

    def __enter__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        columns = (
            TextColumn("{task.description:<34}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        self.bar = Progress(*columns, console=err_console)
        self.bar.__enter__()
        self.overall = self.bar.add_task("study", total=1)
        self.current = None
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def plan(self, stages):
        self.bar.update(self.overall, total=len(stages), completed=0)

    def start(self, stage, total):
        if self.current is not None:
            self.bar.remove_task(self.current)
        self.current = self.bar.add_task(stage[:34], total=total)

    def advance(self, n=1):
        if self.current is not None:
            self.bar.advance(self.current, n)

    def update(self, done, total):
        if self.current is not None:
            self.bar.update(self.current, completed=done, total=total)

    def finish(self, stage, cached):
        if self.current is not None:
            self.bar.remove_task(self.current)
            self.current = None
        self.bar.advance(self.overall, 1)
        note = "cached" if cached else "done"
        self.bar.console.print(f"[dim]{note}[/] {stage}", highlight=False)


def _quiet_transformers() -> None:
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def register(app: typer.Typer) -> None:
    """Add `study` to the CLI."""
    app.command("study")(study_command)
