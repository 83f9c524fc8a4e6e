"""The study's final console table (rich), one row per method result."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from lorafuse.study.figures import ordered
from lorafuse.study.render import fit_cells

STATUS_STYLE = {"ok": "green", "failed": "bold red", "skipped": "yellow"}


def summary_table(results: dict) -> Table:
    """A rich Table: method, family, kind, loss +- se, passes, converged (yes / no, "-"
    without a fit that can converge), status; grouped by family.

    A failed or skipped method shows "-" as its loss and its status in colour; the caption
    names the study and counts the methods that did not complete.
    """
    name = (results.get("config") or {}).get("name")
    table = Table(title=f"lorafuse study: {name}" if name else "lorafuse study")
    table.add_column("method")
    table.add_column("family")
    table.add_column("kind")
    table.add_column("test loss ± se", justify="right")
    table.add_column("passes", justify="right")
    table.add_column("converged")
    table.add_column("status")
    previous, broken = None, 0
    for m in ordered(results):
        status = str(m.get("status", "?"))
        broken += status != "ok"
        if previous is not None and previous != m.get("family"):
            table.add_section()
        previous = m.get("family")
        if m.get("status") == "ok" and m.get("mean") is not None:
            se = m.get("se")
            loss = f"{m['mean']:.4f}" + ("" if se is None else f" ± {se:.4f}")
        else:
            loss = "-"
        passes = (m.get("cost") or {}).get("passes")
        table.add_row(
            escape(m["name"]),
            escape(str(m.get("family", ""))),
            escape(str(m.get("experts") or "private")),
            loss,
            "-" if passes is None else str(passes),
            fit_cells(m.get("fit"))[2],
            Text(status, style=STATUS_STYLE.get(status, "")),
        )
    if broken:
        table.caption = f"{broken} method(s) did not complete; see report.md for their errors"
    return table
