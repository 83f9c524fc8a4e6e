"""`lorafuse cluster` (MBC clustering) and `lorafuse connect` (mode connectivity)."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafuse.cli.common import console, seed_everything, user_errors
from lorafuse.cli.evaluate import LIBRARY_HELP, _workspace


def cluster_command(
    library: Path = typer.Option(..., help=LIBRARY_HELP),
    k: int = typer.Option(10, help="Number of clusters."),
    experts: str = typer.Option("private", help="Which expert kind to cluster."),
    out: Path = typer.Option(..., help="clusters.json to write (a heat map PNG goes beside)."),
    sparsity: float = typer.Option(0.5, help="Per-expert magnitude quantile zeroed (mttl: 0.5)."),
    seed: int = typer.Option(0, help="Random seed (SVD and k-means)."),
) -> None:
    """Cluster experts by the similarity of their LoRA weights (MBC, as mttl does it)."""
    with user_errors():
        seed_everything(seed)
        from lorafuse.io import write_json
        from lorafuse.select.clustering import mbc_cluster
        from lorafuse.study.figures import plot_similarity

        ws = _workspace(library, None, None)
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
        plot = plot_similarity(result, out.with_suffix(".png"), names=lib.names)
        for c in clusters:
            console.print(f"cluster {c['cluster']}: {', '.join(c['experts'])}", highlight=False)
        console.print(f"-> {out}, heat map {plot}")


def connect_command(
    library: Path = typer.Option(..., help=LIBRARY_HELP),
    pair: list[str] = typer.Option(..., help="Two experts 'A,B' (repeat for several pairs)."),
    experts: str = typer.Option("private", help="Which expert kind."),
    alphas: int = typer.Option(11, help="Number of alphas on a uniform grid over [0, 1]."),
    split: str = typer.Option("test", help="Data split."),
    max_examples_per_task: int = typer.Option(None, help="Cap per task for quick runs."),
    out: Path = typer.Option(..., help="Output folder: connectivity.json and the plot."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Loss along the linear path between two experts vs the per-input oracle (Figure 3)."""
    with user_errors():
        seed_everything(seed)
        from lorafuse.io import atomic_dir, check_output, write_json
        from lorafuse.select.connectivity import connectivity
        from lorafuse.study.figures import plot_connectivity

        check_output(out, force)
        ws = _workspace(library, None, None)
        grid = [i / (alphas - 1) for i in range(alphas)] if alphas > 1 else [0.5]
        curves = []
        for p in pair:
            names = [s.strip() for s in p.split(",")]
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
        console.print(f"-> {out}")


def register(app: typer.Typer) -> None:
    """Add the expert-structure commands to the CLI."""
    app.command("cluster")(cluster_command)
    app.command("connect")(connect_command)
