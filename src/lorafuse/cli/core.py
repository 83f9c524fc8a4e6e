"""`lorafuse info` and `lorafuse merge`."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafuse.cli import options as opt
from lorafuse.cli.common import (
    console,
    parse_dtype,
    parse_floats,
    progress_bar,
    seed_everything,
    user_errors,
)

EXPERTS_HELP = (
    "PEFT adapter folders, folders of them, hub ids (owner/name[/sub/folder][@revision]) "
    "or .txt files listing any of these."
)


def info(
    experts: list[Path] = typer.Argument(..., help=EXPERTS_HELP),
    check: bool = typer.Option(
        False, "--check", help="Check whether they can be fused, reading headers only."
    ),
    base: str = typer.Option(
        None,
        help="With --check: the base model (folder or cached id) to check shapes against; "
        "with --plan: the model to attach to.",
    ),
    plan: bool = typer.Option(
        False, "--plan", help="With --base: which plan each fused layer gets, and why."
    ),
    space: str = typer.Option("factors", help="With --plan: the mixing space."),
    device: str = opt.device("cpu", help="With --plan: cpu, cuda, cuda:1, ..."),
    dtype: str = opt.dtype("fp32", help="With --plan: fp32 or bf16."),
    seed: int = opt.seed(help="Random seed (info is deterministic; kept for symmetry)."),
) -> None:
    """Table of the experts: name, rank, alpha, scaling, target modules, parameters.

    With --check, per expert its recorded base model, modules, rank, alpha, scaling and
    every reason it would be refused, from configs and weight-file headers only; exit 0
    when the library can be fused, 2 when not. With --plan and --base, the plans
    (lorafuse.fast) the fused layers get for a merge, a dense router and a top-k router
    on this machine, device and dtype, and why.
    """
    from rich.table import Table

    with user_errors():
        seed_everything(seed)
        from lorafuse.errors import LorafuseError

        if check and plan:
            raise LorafuseError("--check and --plan are two reports; ask for one at a time")
        if base is not None and not (check or plan):
            raise LorafuseError("--base goes with --check or --plan (info alone needs none)")
        if plan and base is None:
            raise LorafuseError("--plan needs --base: the model the experts attach to")
        if check:
            _check(experts, base)
            return
        if plan:
            _plans(experts, base, space, device, dtype)
            return
        from lorafuse.library import ExpertLibrary

        with _fetching(experts) as advance:
            lib = ExpertLibrary.load(experts, progress=advance)
        table = Table(title=f"{len(lib)} experts, {len(lib.modules)} target modules")
        for col in ("name", "rank", "alpha", "scaling", "modules", "params", "tasks"):
            table.add_column(col, justify="right" if col in ("rank", "params") else "left")
        for row in lib.describe():
            tasks = ",".join(row["tasks"][:3]) + (" ..." if len(row["tasks"]) > 3 else "")
            table.add_row(
                row["name"],
                str(row["rank"]),
                f"{row['alpha']:g}",
                str(row["scaling"]),
                str(row["n_modules"]),
                f"{row['params']:,}",
                tasks,
            )
        console.print(table)
        console.print(_coverage_table(lib))
        console.print(f"base model: {lib.base_model or 'not recorded'}", highlight=False)


def _fetching(experts):
    """A progress bar over the hub ids among `experts` (a no-op when there are none)."""
    import contextlib

    from lorafuse.formats.hub import count_hub_refs

    n = count_hub_refs(experts)
    return progress_bar(n, "fetching experts") if n else contextlib.nullcontext(None)


def _plans(experts: list[Path], base: str, space: str, device: str, dtype: str) -> None:
    from collections import Counter

    from transformers import AutoModelForCausalLM

    from lorafuse.devices import device as parse_device
    from lorafuse.factors import check_space
    from lorafuse.library import ExpertLibrary
    from lorafuse.mixers.routers import build_routers
    from lorafuse.mixers.static import Uniform
    from lorafuse.model import attached

    check_space(space)
    where = parse_device(device, "--device")
    with _fetching(experts) as advance:
        lib = ExpertLibrary.load(experts, progress=advance)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=parse_dtype(dtype)).to(where)
    console.print(
        f"plans of {len(lib.modules)} fused layers ({space}, {device}, {dtype}):", highlight=False
    )
    with attached(model, lib, space) as fusion:
        mixers = {
            "merge (uniform)": lambda: fusion.set_mixer(Uniform(len(lib))),
            "dense router": lambda: fusion.set_mixers(build_routers(lib, where, "linear")),
            "top-2 Arrow router": lambda: fusion.set_mixers(
                build_routers(lib, where, "arrow", top_k=min(2, len(lib)))
            ),
        }
        for name, set_mixer in mixers.items():
            set_mixer()
            for line, n in Counter(fusion.plans().values()).most_common():
                console.print(f"- {name}, {n} layers: {line}", highlight=False, soft_wrap=True)


def _check(experts: list[Path], base: str | None) -> None:
    from rich.table import Table

    from lorafuse.check import check_experts

    with _fetching(experts) as advance:
        checks = check_experts(experts, base, progress=advance)
    bad = [c for c in checks if not c.ok]
    table = Table(title=f"{len(checks)} experts checked: {len(bad)} would be refused")
    for col in ("name", "base model", "modules", "rank", "alpha", "scaling", "problems"):
        table.add_column(col, justify="right" if col in ("modules", "rank") else "left")

    def one(values):
        return str(values[0]) if len(values) == 1 else str(values)

    for c in checks:
        table.add_row(
            c.name if c.source is None else f"{c.name} ({c.source})",
            c.base_model or "-",
            str(len(c.modules)),
            one(c.ranks) if c.ranks else "-",
            f"{c.alpha:g}" if c.alpha is not None else "-",
            one(c.scalings) if c.scalings else "-",
            "; ".join(c.problems) or "ok",
        )
    console.print(table)
    if bad:
        from lorafuse.errors import LorafuseError

        names = ", ".join(c.name for c in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise LorafuseError(
            f"{len(bad)} of {len(checks)} experts cannot be fused ({names}); see the problems "
            "column, and leave those experts out or fix them"
        )
    console.print(f"ok: the {len(checks)} experts can be fused", highlight=False)


#: merges whose disjoint mean already averages: their default weight is 1 per expert
DISJOINT_MEANS = ("ties", "dare-ties")


def _coverage_table(lib):
    """Experts grouped by the modules they adapt: per module name, how many layers."""
    from rich.table import Table

    cov = lib.coverage()  # short name -> per expert count
    union = {s: sum(m.rsplit(".", 1)[-1] == s for m in lib.modules) for s in cov}
    groups: dict[tuple[int, ...], list[str]] = {}
    for i, name in enumerate(lib.names):
        groups.setdefault(tuple(cov[s][i] for s in cov), []).append(name)
    same = (
        "every expert adapts the same modules"
        if len(groups) == 1
        else "mixed: fused over the union"
    )
    table = Table(title=f"module coverage ({same}): modules adapted per name, of the union's")
    table.add_column("experts")
    for s in cov:
        table.add_column(f"{s} ({union[s]})", justify="right")
    for counts, names in groups.items():
        shown = ", ".join(names[:4]) + (f" +{len(names) - 4}" if len(names) > 4 else "")
        table.add_row(shown, *map(str, counts))
    return table


def merge(
    experts: list[Path] = typer.Argument(..., help=EXPERTS_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (a PEFT adapter)."),
    weights: str = typer.Option(
        None, help="Comma-separated weights, one per expert (default 1/N)."
    ),
    method: str = typer.Option(
        "linear",
        help="linear (the paper's, in --space), task-arithmetic, ties, dare-linear, dare-ties, "
        "magnitude-prune, breadcrumbs or peft-linear (see the README's merge table).",
    ),
    space: str = typer.Option(
        "factors", help="linear only: factors (A,B averaged) or deltas (B A averaged)."
    ),
    density: float = opt.fraction(
        None, help="ties, magnitude-prune, breadcrumbs: share of each delta kept."
    ),
    drop: float = opt.probability(None, help="dare-linear, dare-ties: share of entries dropped."),
    gamma: float = opt.probability(None, help="breadcrumbs: share of the largest dropped."),
    normalize: bool = typer.Option(
        None, "--normalize/--no-normalize", help="Divide by the sum of the weights (mergekit)."
    ),
    rank: int = opt.count(None, help="Truncate each module's delta to this rank by SVD."),
    base: Path = typer.Option(
        None, help="Base model folder: also save a full merged transformers model."
    ),
    model_out: Path = typer.Option(None, help="Where to save the full merged model (with --base)."),
    dtype: str = opt.dtype("fp32", help="dtype of the full merged model: fp32 or bf16."),
    force: bool = typer.Option(False, help="Replace the output folders if they exist."),
    seed: int = opt.seed(),
) -> None:
    """Merge experts into one PEFT adapter (and optionally a full merged model).

    Every input and option is checked before anything is written; with --base both
    outputs are written or neither.
    """
    with user_errors():
        seed_everything(seed)
        from lorafuse.delta_merge import METHODS, delta_merge
        from lorafuse.errors import LorafuseError
        from lorafuse.io import check_disjoint, check_output
        from lorafuse.layer import check_space
        from lorafuse.library import ExpertLibrary
        from lorafuse.merge import merge as merge_experts
        from lorafuse.merge import save_adapter, save_merged_model

        check_space(space)
        values = parse_floats(weights, "--weights")
        given = {"density": density, "drop": drop, "gamma": gamma, "normalize": normalize}
        given = {k: v for k, v in given.items() if v is not None}
        if method not in ("linear", *METHODS):
            raise LorafuseError(
                f"unknown --method {method!r}; choose linear, {', '.join(sorted(METHODS))}"
            )
        if method == "linear" and given:
            raise LorafuseError(
                f"--method linear takes no {', '.join('--' + k for k in given)}; those belong "
                "to task-arithmetic, ties, dare-*, magnitude-prune and breadcrumbs"
            )
        if method != "linear" and space != "factors":
            raise LorafuseError(f"--space is linear's; --method {method} works on the deltas")
        if (base is None) != (model_out is None):
            raise LorafuseError("--base and --model-out go together (both or neither)")
        check_output(out, force, kind="dir")
        if model_out is not None:
            check_output(model_out, force, kind="dir")
        check_disjoint(
            {"--out": out, "--model-out": model_out}, {"EXPERTS": experts, "--base": base}
        )
        if base is not None and not (base / "config.json").is_file():
            raise LorafuseError(
                f"--base {base} is not a transformers model folder (no config.json); give the "
                "folder the base model was saved to (save_pretrained)"
            )
        with _fetching(experts) as advance:
            lib = ExpertLibrary.load(experts, progress=advance)
        if method == "linear":
            merged = merge_experts(lib, values, space, rank)
        else:
            if values is None and method in DISJOINT_MEANS:  # they average already
                values = [1.0] * len(lib)
            takes_seed = "seed" in (METHODS[method].__kwdefaults__ or {})
            merged = delta_merge(
                lib, method, values, rank, **given, **({"seed": seed} if takes_seed else {})
            )
        model = tok = state = None
        if base is not None:  # load before writing anything: a bad base writes nothing
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from lorafuse.merge import merged_state_dict

            model = AutoModelForCausalLM.from_pretrained(str(base), dtype=parse_dtype(dtype))
            tok = AutoTokenizer.from_pretrained(str(base)) if _has_tokenizer(base) else None
            state = merged_state_dict(model, merged)  # checks the merge fits this model
        save_adapter(merged, out, force=force)
        if model is not None:
            try:
                save_merged_model(model, merged, model_out, tok, force, state)
            except BaseException:
                import shutil

                shutil.rmtree(out, ignore_errors=True)  # both outputs or neither
                raise
        how = f"in {space} space" if method == "linear" else f"by {method}"
        msg = f"merged {len(lib)} experts {how} -> {out} (rank {merged.rank})"
        if merged.energy:
            kept = list(merged.energy.values())
            worst = min(merged.energy, key=merged.energy.get)
            msg += (
                f"; spectral energy kept per module: worst {min(kept):.4f} ({worst}), "
                f"mean {sum(kept) / len(kept):.4f}"
            )
        console.print(msg, highlight=False)
        if model is not None:
            console.print(f"full merged model -> {model_out}", highlight=False)


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))


def register(app: typer.Typer) -> None:
    """Add the core commands to the CLI."""
    app.command()(info)
    app.command()(merge)
