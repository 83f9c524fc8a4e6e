"""Evaluate, generate, build a matrix, fit and run a study; save what came out (for tests).

    python tests/parallel/script.py <bench> <study config> <out>
    accelerate launch --cpu --num_processes 2 tests/parallel/script.py <bench> <config> <out>
Every process records the files and folders it creates or tries to remove (os.replace,
os.mkdir, os.unlink, os.rmdir) under <bench>, <out> and the study's library;
`<out>/writes-<rank>.json` lists them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from lorafuse import parallel

WRITES: list[str] = []


def record_writes(roots: list[Path]) -> None:
    """Log every rename into place, every new folder and every removal tried under `roots`
    (this process's)."""
    replace, mkdir, unlink, rmdir = os.replace, os.mkdir, os.unlink, os.rmdir
    prefixes = [str(r.resolve()) for r in roots]

    def note(path) -> None:
        p = str(Path(path).resolve())
        if any(p.startswith(r) for r in prefixes):
            WRITES.append(p)

    def replace_(src, dst, *args, **kw):
        replace(src, dst, *args, **kw)
        note(dst)

    def mkdir_(path, *args, **kw):
        mkdir(path, *args, **kw)
        note(path)

    def remove_(remove):  # an attempt counts: a process removing what another wrote
        def removed(path, *args, **kw):  # races with it, even when the file is not there yet
            if "dir_fd" not in kw:  # shutil.rmtree's names relative to a folder: not ours
                note(path)
            return remove(path, *args, **kw)

        return removed

    os.replace, os.mkdir = replace_, mkdir_
    os.unlink = os.remove = remove_(unlink)
    os.rmdir = remove_(rmdir)


def run(bench: Path, config: Path, out: Path) -> dict:
    """Every stage's numbers, as plain values."""
    from lorafuse.matrix import expert_task_matrix
    from lorafuse.methods.run import evaluate_method, fit_method, generate_answers
    from lorafuse.spec import load_spec
    from lorafuse.study.config import load_config
    from lorafuse.study.runner import StudyRun, run_study
    from lorafuse.workspace import Workspace

    spec = load_spec(bench)
    spec.batch_size = 2  # several batches per split: every process gets some
    spec.fits = str(out / "fits")
    ws = Workspace(spec)
    got: dict = {"seconds": {}}
    start = time.perf_counter()
    for name in ("oracle", "ensemble-uniform"):
        got[f"eval {name}"] = evaluate_method(ws, name, "validation").to_dict()["per_task"]
    answers = generate_answers(ws, "oracle", "validation", max_new_tokens=8)
    got["answers"] = answers["per_task"]
    got["seconds"]["eval"] = time.perf_counter() - start
    start = time.perf_counter()
    m = expert_task_matrix(ws, "private", "validation", cache_dir=out / "cache")
    got["matrix"] = m.losses.tolist()
    again = expert_task_matrix(ws, "private", "validation", cache_dir=out / "cache")  # cached
    got["matrix again"] = again.losses.tolist()
    got["seconds"]["matrix"] = time.perf_counter() - start
    start = time.perf_counter()
    options = {"lr": 0.05, "epochs": 2, "batch_size": 4}
    fit = fit_method(ws, "ensemble-sgd", "private", options)
    got["fit"] = fit.payload["weights"]
    got["eval fit"] = evaluate_method(ws, "ensemble-sgd", "validation").to_dict()["per_task"]
    got["seconds"]["fit"] = time.perf_counter() - start
    start = time.perf_counter()
    results = run_study(StudyRun(load_config(config), out / "study"))
    got["study"] = {f"{r['name']}@{r['experts']}": r.get("per_task") for r in results["methods"]}
    got["status"] = {f"{r['name']}@{r['experts']}": r["status"] for r in results["methods"]}
    got["analyses"] = {k: v for k, v in results["analyses"].items() if k != "connectivity"}
    got["seconds"]["study"] = time.perf_counter() - start
    again = run_study(StudyRun(load_config(config), out / "study"))  # every stage cached
    got["resumed"] = {k: v["cached"] for k, v in again["stages"].items()}
    got["study again"] = {f"{r['name']}@{r['experts']}": r.get("per_task")
                          for r in again["methods"]}  # fmt: skip
    return got


if __name__ == "__main__":
    bench, config, out = (Path(a) for a in sys.argv[1:4])
    library = Path(yaml.safe_load(config.read_text())["build"]["out"])
    record_writes([bench, out, library])
    torch.set_num_threads(1)
    got = run(bench, config, out)
    me = parallel.rank()
    (out / f"writes-{me}.json").write_text(json.dumps(sorted(set(WRITES))))
    if parallel.is_main_process():
        (out / "got.json").write_text(json.dumps(got))
    parallel.barrier()  # leave together, then close the process group: a gloo group
    if torch.distributed.is_initialized():  # left open aborts at exit ("terminate called")
        torch.distributed.destroy_process_group()
