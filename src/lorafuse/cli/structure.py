"""`lorafuse cluster` (MBC clustering) and `lorafuse connect` (mode connectivity)."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafuse.cli import options as opt
from lorafuse.cli.common import console, parse_names, seed_everything, user_errors
from lorafuse.cli.evaluate import LIBRARY_HELP, _workspace, setup_inputs


def cluster_command(
    library: Path = typer.Option(..., help=LIBRARY_HELP),
    k: int = opt.count(10, help="Number of clusters."),
    experts: str = typer.Option("private", help="Which expert kind to cluster."),
    out: Path = typer.Option(..., help="clusters.json to write (a heat map PNG goes beside)."),
    sparsity: float = opt.probability(
        0.5, help="Per-expert magnitude quantile zeroed (mttl: 0.5)."
    ),
    seed: int = opt.seed(help="Random seed (SVD and k-means)."),
) -> None:
    """Cluster experts by the similarity of their LoRA weights (MBC, as mttl does it)."""
    with user_errors():
        seed_everything(seed)
        from lorafuse.errors import LorafuseError
        from lorafuse.io import check_disjoint, check_output, write_json
        from lorafuse.select.clustering import mbc_cluster
        from lorafuse.study.figures import plot_similarity

        ws = _workspace(library, None, None)
        plot_path = out.with_suffix(".png")
        if plot_path == out:
            raise LorafuseError(f"--out {out} ends in .png; give the path of a .json file")
        for path in (out, plot_path):
            check_output(path, force=True, kind="file")
        outputs = {"--out": out, "the heat map": plot_path}
        check_disjoint(outputs, {"--library": library, **setup_inputs(ws)})
        lib = ws.library(experts)
        result = mbc_cluster(lib, k=k, sparsity=sparsity, seed=seed)
        clusters = [
            {
                "cluster": c,
                "experts": [lib.names[i] for i in members],
                "tasks": sorted({t for i in members for t in lib.experts[i].tasks}),
            }
            for c, members in enumerate(result.clusters)
        ]
        write_json(out, {"k": k, "experts_kind": experts, "seed": seed, "clusters": clusters})
        plot = plot_similarity(result, plot_path, names=lib.names)
        for c in clusters:
            console.print(f"cluster {c['cluster']}: {', '.join(c['experts'])}", highlight=False)
        console.print(f"-> {out}, heat map {plot}", highlight=False)


def connect_command(
    library: Path = typer.Option(..., help=LIBRARY_HELP),
    pair: list[str] = typer.Option(..., help="Two experts 'A,B' (repeat for several pairs)."),
    experts: str = typer.Option("private", help="Which expert kind."),
    alphas: int = opt.count(11, help="Number of alphas on a uniform grid over [0, 1]."),
    split: str = opt.split("test"),
    max_examples_per_task: int = opt.count(None, help="Cap per task for quick runs."),
    out: Path = typer.Option(..., help="Output folder: connectivity.json and the plot."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    seed: int = opt.seed(),
) -> None:
    """Loss along the linear path between two experts vs the per-input oracle (Figure 3)."""
    with user_errors():
        seed_everything(seed)
        from lorafuse.errors import LorafuseError
        from lorafuse.io import atomic_dir, check_disjoint, check_output, write_json
        from lorafuse.select.connectivity import connectivity
        from lorafuse.study.figures import plot_connectivity

        check_output(out, force, kind="dir")
        ws = _workspace(library, None, None)
        check_disjoint({"--out": out}, {"--library": library, **setup_inputs(ws)})
        pairs = [parse_names(p, "--pair") for p in pair]
        lib = ws.library(experts)
        for names in pairs:
            unknown = [n for n in names if n not in lib.names]
            if len(set(names)) != 2 or len(names) != 2 or unknown:
                raise LorafuseError(
                    f"--pair {','.join(names)!r} must name two different {experts} experts"
                    + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                )
        grid = [i / (alphas - 1) for i in range(alphas)] if alphas > 1 else [0.5]
        curves = []
        for names in pairs:
            curves.append(connectivity(ws, experts, names, grid, split, max_examples_per_task))
            c = curves[-1]
            console.print(
                f"{c['pair'][0]} -> {c['pair'][1]}: endpoints {c['loss'][0]:.4f} / "
                f"{c['loss'][-1]:.4f}, best on path {min(c['loss']):.4f}, per-input oracle "
                f"{c['oracle']:.4f}",
                highlight=False,
            )
        with atomic_dir(out, force) as tmp:
            write_json(tmp / "connectivity.json", {"seed": seed, "curves": curves})
            plot_connectivity(curves, tmp / "connectivity.png")
        console.print(f"-> {out}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the expert-structure commands to the CLI."""
    app.command("cluster")(cluster_command)
    app.command("connect")(connect_command)
