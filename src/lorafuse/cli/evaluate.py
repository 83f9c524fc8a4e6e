"""`lorafuse eval`, `lorafuse matrix`, `lorafuse table` and `lorafuse refactor`."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from lorafuse.cli import options as opt
from lorafuse.cli.common import console, progress_bar, seed_everything, styled, user_errors
from lorafuse.parallel import is_main_process

LIBRARY_HELP = "A benchmark folder (lorafuse benchmark build) or a YAML library spec."


def _workspace(library: Path, device: str | None, dtype: str | None):
    from lorafuse.spec import load_spec
    from lorafuse.workspace import Workspace

    return Workspace(load_spec(library), device=device, dtype=dtype)


def bar(total: int | None, description: str, unit: str = ""):
    """`progress_bar` on the main process; a silent callback on the others (under
    `accelerate launch` every process runs the command, one speaks)."""
    if is_main_process():
        return progress_bar(total, description, unit)
    return contextlib.nullcontext(lambda n=1: None)


def setup_inputs(ws) -> dict[str, list[str]]:
    """The local files and folders a workspace reads (its spec file, base model, data,
    tokenizer, expert folders), labelled for `lorafuse.io.check_disjoint`."""
    spec = ws.spec
    inputs: dict[str, list[str]] = {}
    for label, value in (("base_model", spec.base_model), ("data", spec.data)):
        inputs[f"the setup's {label}"] = [spec.path(value)]
    if spec.tokenizer:
        inputs["the setup's tokenizer"] = [spec.path(spec.tokenizer)]
    for kind in spec.experts:
        inputs[f"the {kind} experts"] = spec.expert_paths(kind)
    return {k: [v for v in vs if Path(v).exists()] for k, vs in inputs.items()}


def check_methods(ws, names: list[str], experts: str) -> None:
    """Resolve every method name and the expert kind before any work (LorafuseError)."""
    from lorafuse.methods.registry import resolve

    for name in names:
        resolve(name)
    if experts not in ws.spec.experts:
        ws.library(experts)  # raises, naming the kinds this setup has


def eval_command(
    library: Path = typer.Option(..., help=LIBRARY_HELP),
    method: list[str] = typer.Option(..., help="Method name(s), e.g. oracle, single:<expert>."),
    split: str = opt.split("test"),
    experts: str = typer.Option("private", help="Which expert kind: private, mbc, ..."),
    out: Path = typer.Option(None, help="Result JSON (one method) or folder (several)."),
    max_examples_per_task: int = opt.count(None, help="Cap per task for quick runs."),
    answers: bool = typer.Option(
        True, help="Also generate each example's answer: exact match and Rouge-L per task."
    ),
    max_new_tokens: int = opt.count(
        64, help="Most tokens of a generated answer (each task's cap comes from its data)."
    ),
    device: str = opt.device(None, help="cpu, cuda, cuda:1 ... (default: the spec's)."),
    dtype: str = opt.dtype(None, help="fp32 or bf16 (default: the spec's)."),
    seed: int = opt.seed(),
) -> None:
    """Per-task test loss of one or more methods, mean +- standard error over tasks, and
    (unless --no-answers) the exact match and Rouge-L of their greedy answers.

    Every method is evaluated before any result is written; results replace earlier files
    of the same name.
    """
    with user_errors():
        seed_everything(seed)
        from lorafuse.io import check_disjoint, check_output, write_json
        from lorafuse.methods.run import evaluate_method, generate_answers, total_rows
        from lorafuse.report import markdown_table

        ws = _workspace(library, device, dtype)
        check_methods(ws, method, experts)
        targets = []
        if out is not None:
            one = len(method) == 1
            targets = [out] if one else [out / f"{n.replace(':', '_')}.json" for n in method]
            check_output(out, force=True, kind="file" if one else "dir")
            check_disjoint({"--out": out}, {"--library": library, **setup_inputs(ws)})
        results = []
        for name in method:
            total = total_rows(ws, split, max_examples_per_task)
            with bar(total, name) as advance:
                r = evaluate_method(ws, name, split, experts, max_examples_per_task, advance)
            if answers:
                with bar(total, f"{name}: answers") as advance:
                    r.answers = generate_answers(
                        ws, name, split, experts, max_examples_per_task, max_new_tokens,
                        progress=advance,
                    )  # fmt: skip
            r.settings["seed"] = seed
            results.append(r)
        if not is_main_process():  # under accelerate launch: one writer
            return
        for target, r in zip(targets, results):
            write_json(target, r.to_dict())
        console.print(markdown_table(results), highlight=False, soft_wrap=True)


def matrix_command(
    library: Path = typer.Option(..., help=LIBRARY_HELP),
    experts: str = typer.Option("private", help="Which expert kind: private, mbc, ..."),
    split: str = opt.split("validation"),
    out: Path = typer.Option(..., help="Matrix JSON to write."),
    max_examples_per_task: int = opt.count(None, help="Cap per task for quick runs."),
    rows_per_pass: int = opt.count(256, help="Rows (examples x experts) per forward."),
    cache: Path = typer.Option(None, help="Cache folder (default: next to --out)."),
    base: bool = typer.Option(
        True, help="Also score the base model on each task (for the off-task ratio)."
    ),
    device: str = opt.device(None, help="cpu, cuda, ... (default: the spec's)."),
    dtype: str = opt.dtype(None, help="fp32 or bf16 (default: the spec's)."),
    seed: int = opt.seed(),
) -> None:
    """The expert x task loss matrix, many experts per batched forward; resumable."""
    with user_errors():
        seed_everything(seed)
        from lorafuse.io import check_disjoint, check_output
        from lorafuse.matrix import expert_task_matrix
        from lorafuse.methods.run import total_rows

        ws = _workspace(library, device, dtype)
        check_output(out, force=True, kind="file")
        cache = cache or out.parent / f".{out.name}.cache"
        check_output(cache, force=True, kind="dir")
        outputs = {"--out": out, "--cache": cache}
        check_disjoint(outputs, {"--library": library, **setup_inputs(ws)})
        total = total_rows(ws, split, max_examples_per_task) * len(ws.library(experts))
        with bar(total, f"matrix {experts}/{split}", "expert-examples") as advance:
            m = expert_task_matrix(
                ws, experts, split, max_examples_per_task, rows_per_pass, cache, advance
            )
        if base:  # the base model's row, for the off-task ratio of `lorafuse refactor`
            from lorafuse.methods.run import base_task_losses

            with bar(None, "matrix base model"):
                m.base = base_task_losses(ws, m.tasks, split, max_examples_per_task)
        m.meta["seed"] = seed
        if not is_main_process():  # under accelerate launch: one writer
            return
        m.save(out)
        console.print(f"{len(m.experts)} experts x {len(m.tasks)} tasks -> {out}")


def fit_command(
    library: Path = typer.Option(..., help=LIBRARY_HELP),
    method: list[str] = typer.Option(..., help="Method(s) to fit, e.g. ensemble-exact."),
    experts: str = typer.Option("private", help="Which expert kind: private, mbc, ..."),
    max_examples_per_task: int = opt.count(None, help="Cap per task of the training data."),
    epochs: int = opt.count(None, help="Epochs of SGD-trained methods (default per method)."),
    lr: list[float] = opt.number(
        None, help="Learning rate(s); several form the grid.", positive=True
    ),
    batch_size: int = opt.count(None, help="Examples per optimizer step."),
    max_steps: int = opt.count(
        None, help="Step cap of SGD; without --epochs, no epoch budget (until a plateau)."
    ),
    patience: int = opt.count(
        None, help="Stop SGD after this many validations without improvement (a plateau)."
    ),
    eval_every: int = opt.count(None, help="Steps between validations (default: an epoch)."),
    min_delta: float = opt.number(
        None,
        help="Relative improvement a validation must make to count (default 0.001).",
        nonneg=True,
    ),
    objective: str = typer.Option(
        None, help="SGD training loss: task (task-balanced, the default) or token (the paper's)."
    ),
    device: str = opt.device(None, help="cpu, cuda, ... (default: the spec's)."),
    dtype: str = opt.dtype(None, help="fp32 or bf16 (default: the spec's)."),
    seed: int = opt.seed(),
) -> None:
    """Fit methods' coefficients and save them under the setup's fits/ folder.

    Each SGD fit prints how it ended: steps, stop (plateau, step cap, epochs) and
    converged (true exactly when it stopped on a plateau).
    """
    with user_errors():
        seed_everything(seed)
        from lorafuse.cli.progress import Stages
        from lorafuse.methods.registry import resolve
        from lorafuse.methods.run import fit_method

        ws = _workspace(library, device, dtype)
        check_methods(ws, method, experts)
        options = {
            "max_examples_per_task": max_examples_per_task,
            "epochs": epochs,
            "lr_grid": list(lr) if lr else None,
            "lr": lr[0] if lr else None,
            "batch_size": batch_size,
            "max_steps": max_steps,
            "patience": patience,
            "eval_every": eval_every,
            "min_delta": min_delta,
            "objective": objective,
            "seed": seed,
        }
        options = {k: v for k, v in options.items() if v is not None}
        if max_steps is not None and epochs is None:
            options["epochs"] = None  # the step cap alone bounds the run
        for name in method:
            declared = resolve(name)[0]  # each method gets the flags it declares
            mine = {k: v for k, v in options.items() if declared.declares(k)}
            if not is_main_process():  # under accelerate launch: the others work silently
                fit_method(ws, name, experts, mine)
                continue
            with Stages() as stages:  # a log gets lines, a terminal a bar
                stages.start(f"fit {name} over the {experts} experts")
                fit = fit_method(ws, name, experts, mine, stages.tick)
                stages.finish()
            shown = {k: v for k, v in fit.payload.items() if isinstance(v, (int, float, str))}
            console.print(styled(f"{name}:", "bold", str(shown)), highlight=False)


def table_command(
    results: list[Path] = typer.Argument(..., help="Result JSON files or folders of them."),
) -> None:
    """A markdown table of result files (mean +- se over tasks)."""
    with user_errors():
        from lorafuse.report import load_results, markdown_table

        console.print(markdown_table(load_results(results)), highlight=False, soft_wrap=True)


def refactor_command(
    matrix: Path = typer.Argument(..., help="A matrix JSON from `lorafuse matrix`."),
    out: Path = typer.Option(..., help="Output folder: refactor.json and the greedy plot."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    seed: int = opt.seed(help="Random seed (the analysis is deterministic)."),
) -> None:
    """Ranking, greedy task-level selection curve and plot from an expert x task matrix."""
    with user_errors():
        seed_everything(seed)
        from lorafuse.io import atomic_dir, check_disjoint, check_output, write_json
        from lorafuse.matrix import LossMatrix
        from lorafuse.select.refactor import PLOT, REPORT, refactor
        from lorafuse.study.figures import plot_greedy

        check_output(out, force, kind="dir")
        check_disjoint({"--out": out}, {"MATRIX": matrix})
        r = refactor(LossMatrix.load(matrix))
        oracle = r["target_loss"] if r["target"] == "private oracle" else None
        with atomic_dir(out, force) as tmp:
            write_json(tmp / REPORT, r)
            curve = [g["loss"] for g in r["greedy"]]
            title = f"greedy selection ({r['n_experts']} experts)"
            plot_greedy(curve, r["target_loss"], tmp / PLOT, r["k_reached"], oracle, title)
        n = r["n_experts"]
        k = r["k_reached"]
        greedy = f"{k} of {n} experts ({k / n:.0%})" if k else f"none of the {n} subsets"
        ratio = r.get("off_task_ratio")
        off = "not measured (the matrix has no base row: `lorafuse matrix --base`)"
        if ratio is not None:
            off = (
                f"{ratio:.2f} (experts' mean loss on the other tasks {r['off_task_loss']:.3f}, "
                f"base model {r['base_loss']:.3f})"
            )
        console.print(
            f"not the best on their own task: {r['n_not_best_on_own_task']} of {n} experts "
            f"({r['n_not_best_on_own_task'] / n:.0%}; paper 58 of 256)\n"
            f"greedy selection reaches the {r['target']} loss ({r['target_loss']:.4f}) with "
            f"{greedy} (paper 150 of 256)\n"
            f"off-task loss / base model's: {off}\n"
            f"{r['resembles']}\n-> {out}",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    """Add the evaluation commands to the CLI."""
    app.command("eval")(eval_command)
    app.command("matrix")(matrix_command)
    app.command("fit")(fit_command)
    app.command("table")(table_command)
    app.command("refactor")(refactor_command)
