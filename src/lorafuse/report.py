"""Rendering results: markdown tables of one or many result files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lorafuse.errors import LorafuseError
from lorafuse.evaluate import Result
from lorafuse.formats.schema import read_json


def load_results(paths: Sequence[str | Path]) -> list[Result]:
    """Read result JSON files (folders are searched for *.json); raises LorafuseError for
    a missing path and FileFormatError naming the file and field for a malformed one."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.json")))
        elif p.is_file():
            files.append(p)
        else:
            raise LorafuseError(f"result file {p} does not exist")
    out = [Result.from_dict(read_json(f, what="result file"), f) for f in files]
    if not out:
        raise LorafuseError(f"no result files found in {', '.join(map(str, paths))}")
    return out


def markdown_table(results: Sequence[Result]) -> str:
    """| method | experts | split | tasks | loss +- se | token loss | passes | as markdown,
    with exact match and Rouge-L (mean +- se over tasks) when a result has answers."""
    answers = any(r.answers for r in results)
    head = (
        "| method | experts | split | tasks | loss (mean +- se over tasks) | token loss | passes |"  # noqa: E501
    )
    rule = "|---|---|---|---:|---:|---:|---:|"
    if answers:
        head += " exact match | Rouge-L |"
        rule += "---:|---:|"
    rows = [head, rule]
    for r in results:
        row = (
            f"| {r.method} | {r.settings.get('experts', '')} | {r.split} | {r.n_tasks} "
            f"| {r.mean:.4f} +- {r.se:.4f} | {r.token_mean:.4f} | {r.settings.get('passes', 1)} |"
        )
        if answers:
            row += "".join(f" {score(r.answers, m)} |" for m in ("exact_match", "rouge_l"))
        rows.append(row)
    return "\n".join(rows)


def score(answers: dict | None, metric: str) -> str:
    """'0.4375 +- 0.0698' of a metric of generated answers, '' without answers."""
    if not answers or metric not in answers:
        return ""
    return f"{answers[metric]['mean']:.4f} +- {answers[metric]['se']:.4f}"
