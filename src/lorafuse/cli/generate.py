"""`lorafuse generate`: greedy answers of any method to prompts given on the command line."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from lorafuse.cli import options as opt
from lorafuse.cli.common import console, seed_everything, user_errors
from lorafuse.cli.evaluate import LIBRARY_HELP, _workspace, check_methods


def generate_command(
    library: Path = typer.Option(..., help=LIBRARY_HELP),
    method: str = typer.Option(..., help="Method, e.g. route-sgd, merge-uniform, ensemble-sgd."),
    prompt: list[str] = typer.Option(..., help="A prompt; repeat for several (one batch)."),
    task: str = typer.Option(
        None, help="The prompts' task: the oracle answers with that task's expert."
    ),
    experts: str = typer.Option("private", help="Which expert kind: private, mbc, ..."),
    max_new_tokens: int = opt.count(32, help="Most tokens of each answer."),
    device: str = opt.device(None, help="cpu, cuda, cuda:1 ... (default: the spec's)."),
    dtype: str = opt.dtype(None, help="fp32 or bf16 (default: the spec's)."),
    seed: int = opt.seed(help="Random seed (decoding is greedy: deterministic)."),
) -> None:
    """Greedy answer of one method to each prompt (KV cache; an ensemble runs all its
    experts in one forward per token). Fitted methods read their fit from the setup's
    fits folder (`lorafuse fit`). One answer is printed per prompt, in order."""
    with user_errors():
        seed_everything(seed)
        from lorafuse.methods.run import generate_text

        ws = _workspace(library, device, dtype)
        check_methods(ws, [method], experts)
        with console.status(Text(f"{method} over the {experts} experts")):
            answers = generate_text(ws, method, list(prompt), experts, task, max_new_tokens)
        for i, answer in enumerate(answers):
            head = f"[{i + 1}] " if len(answers) > 1 else ""
            console.print(Text(head + answer), highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `generate` to the CLI."""
    app.command("generate")(generate_command)
