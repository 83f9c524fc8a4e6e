"""The `lorafuse` command line: thin over the library, torch imported only inside commands.

Each command group lives in its own module and registers itself on `app` here.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="lorafuse",
    help="Ensemble, merge and route a library of LoRA experts, and measure which is worth it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    debug: bool = typer.Option(
        False, "--debug", help="Show the Python traceback of an internal error (a bug)."
    ),
) -> None:
    """Ensemble, merge and route a library of LoRA experts, and measure which is worth it."""
    from lorafuse.cli.common import DEBUG

    DEBUG["on"] = DEBUG["on"] or debug


def _register() -> None:
    from lorafuse.cli import (
        compare,
        convert,
        core,
        evaluate,
        generate,
        methods,
        structure,
        study,
    )

    core.register(app)
    convert.register(app)
    evaluate.register(app)
    generate.register(app)
    methods.register(app)
    structure.register(app)
    study.register(app)
    compare.register(app)
    try:  # the benchmark commands (their module may be absent in a partial install)
        from lorafuse.cli import benchmark
    except ImportError:
        return
    benchmark.register(app)


_register()


def main() -> None:
    """Entry point of the console script."""
    app()
