"""The flan-flat schema (mttl's "flan-10k-flat"): read, validate, filter and write it.

One row per example with columns `source, target, task_name, task_source,
template_type, template_idx, split`, split being train / validation / test. The same
reader takes a local parquet or jsonl file (or a folder of them), a folder written by
`datasets.Dataset.save_to_disk`, or a hub dataset id (loaded through `datasets`).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from lorafuse.data.errors import DataError
from lorafuse.io import atomic_dir

COLUMNS = ("source", "target", "task_name", "task_source", "template_type", "template_idx", "split")
SPLITS = ("train", "validation", "test")
DATA_FILE = "flan_flat.parquet"


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence `datasets` progress bars for the duration (library code never prints)."""
    from datasets.utils import logging as ds_logging

    was_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            ds_logging.enable_progress_bar()


def _read(source: str | Path):
    from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset, load_from_disk

    path = Path(source)
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        try:
            ds = load_from_disk(str(path))
        except Exception as e:  # a truncated or hand-edited save_to_disk folder
            raise DataError(
                f"data {path}: not a readable saved dataset ({_first_line(e)})"
            ) from None
        return concatenate_datasets(list(ds.values())) if isinstance(ds, DatasetDict) else ds
    if path.is_dir():
        files = sorted(path.glob("*.parquet")) or sorted(path.glob("*.jsonl"))
        if not files:
            raise DataError(
                f"{path} holds no *.parquet or *.jsonl file and is not a saved dataset; "
                "point --data at flan-flat data"
            )
        path = files[0] if len(files) == 1 else path
    else:
        files = [path]
    if path.exists():
        kind = "parquet" if files[0].suffix == ".parquet" else "json"
        if files[0].suffix not in (".parquet", ".jsonl", ".json"):
            raise DataError(f"{files[0]}: unknown data format; use .parquet, .jsonl or a folder")
        if kind == "parquet":
            for f in files:
                _check_parquet(f)
        try:
            ds = load_dataset(kind, data_files=[str(f) for f in files], split="train")
        except Exception as e:  # a corrupt file: datasets' and pyarrow's errors alike
            raise DataError(f"data {path}: cannot be read as {kind} ({_first_line(e)})") from None
        if len(ds) == 0:
            raise DataError(f"data {path} holds no rows; point --data at flan-flat data")
        return ds
    if str(source).count("/") != 1:
        raise DataError(f"data {source} does not exist (and is not a hub id 'owner/name')")
    try:
        out = load_dataset(str(source), split="train")
    except Exception as e:  # the hub or the cache failed: say so, with the id
        raise DataError(f"could not load hub dataset {source!r}: {e}") from None
    return out if isinstance(out, Dataset) else concatenate_datasets(list(out.values()))


def _check_parquet(path: Path) -> None:
    # A DataError naming a parquet file that is corrupt or has no rows (datasets would
    # fail later with an error that names neither).
    import pyarrow.parquet as pq

    try:
        rows = pq.read_metadata(str(path)).num_rows
    except Exception as e:
        raise DataError(f"{path} is not a readable parquet file ({_first_line(e)})") from None
    if rows == 0:
        raise DataError(f"{path} holds no rows; remove it or write the data again")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_flan(
    source: str | Path,
    tasks: list[str] | None = None,
    max_per_task: int | None = None,
    splits: tuple[str, ...] = SPLITS,
):
    """Read flan-flat data into a `datasets.Dataset`, filtered and validated.

    `tasks` keeps only those task names; `max_per_task` keeps at most that many rows per
    task and split (the first in file order). Raises DataError for a corrupt or empty
    file (naming it), missing columns,
    unknown tasks, unknown split values, empty targets, or a kept task with no rows in
    one of `splits`.
    """
    with quiet_datasets():
        ds = _read(source)
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(
            f"data {source} lacks column(s) {', '.join(missing)}; the flan-flat schema needs "
            f"{', '.join(COLUMNS)}"
        )
    ds = ds.select_columns(list(COLUMNS))
    cols = ds.select_columns(["task_name", "split", "target"]).to_dict()
    names, split_col, targets = cols["task_name"], cols["split"], cols["target"]
    known = list(dict.fromkeys(names))
    if tasks is not None:
        unknown = [t for t in tasks if t not in set(known)]
        if unknown:
            raise DataError(
                f"task(s) {', '.join(unknown)} not in {source}; it has {len(known)} tasks, e.g. "
                f"{', '.join(known[:5])}"
            )
    keep_tasks = set(known if tasks is None else tasks)
    bad_split = sorted({s for s in split_col if s not in SPLITS})
    if bad_split:
        raise DataError(f"data {source}: split values {bad_split}; use {', '.join(SPLITS)}")
    count: dict[tuple[str, str], int] = defaultdict(int)
    keep = []
    for i, (name, split) in enumerate(zip(names, split_col)):
        if name not in keep_tasks or (max_per_task and count[name, split] >= max_per_task):
            continue
        if not str(targets[i] or "").strip():
            raise DataError(f"data {source}: row {i} (task {name}) has an empty target")
        count[name, split] += 1
        keep.append(i)
    for name in keep_tasks:
        for split in splits:
            if count[name, split] == 0:
                raise DataError(
                    f"task {name} has no examples in split {split!r} of {source}; "
                    "drop the task (--tasks) or add examples"
                )
    return ds.select(keep)


def task_names(ds) -> list[str]:
    """The task names of a flan-flat dataset in order of first appearance."""
    return list(dict.fromkeys(ds.select_columns(["task_name"]).to_dict()["task_name"]))


def examples(ds, split: str, tasks: list[str] | None = None) -> dict[str, list[tuple[str, str]]]:
    """{task: [(source, target), ...]} for one split, tasks in order of first appearance.

    Raises DataError when a requested task has no example in `split`.
    """
    out: dict[str, list[tuple[str, str]]] = {t: [] for t in (tasks or task_names(ds))}
    c = ds.select_columns(["source", "target", "task_name", "split"]).to_dict()
    for src, tgt, name, s in zip(c["source"], c["target"], c["task_name"], c["split"]):
        if s == split and name in out:
            out[name].append((src, tgt))
    empty = [t for t, rows in out.items() if not rows]
    if empty:
        raise DataError(f"task(s) {', '.join(empty)} have no examples in split {split!r}")
    return out


def write_flan(rows: list[dict], out: str | Path, force: bool = False) -> Path:
    """Write rows of the flan-flat schema as `out/flan_flat.parquet` (atomically)."""
    from datasets import Dataset

    if not rows:
        raise DataError("no rows to write")
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        raise DataError(f"rows lack column(s) {', '.join(missing)}")
    with atomic_dir(out, force) as tmp, quiet_datasets():
        Dataset.from_list([{c: r[c] for c in COLUMNS} for r in rows]).to_parquet(
            str(tmp / DATA_FILE)
        )
    return Path(out)
