"""Run a study: build, caches, fit and evaluate every method, analyses, report.

Every stage goes through the StageCache (study/stages.py): a re-run skips what is done,
an interrupted run resumes, and a run with everything cached only re-renders the report.
A method that fails is recorded with its error and the others still run. The maths is
in the methods and select/ modules; this file only orders and records.

Under `accelerate launch` every process runs the stages in lock step: fits, evaluations,
generation and the experts' cached passes share their work (lorafuse.parallel); the
build and the analyses (clustering, connectivity, greedy selection) run once on the
main process, which alone writes the stage cache, the fits and the report.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafuse.errors import LorafuseError
from lorafuse.parallel import once
from lorafuse.study.config import MethodConfig, StudyConfig
from lorafuse.study.library_info import library_info
from lorafuse.study.stages import FIT_RULES, Progress, StageCache, setup_key, stage_key

RESULTS = "results.json"
FORMAT = "lorafuse-study/1"


@dataclass
class StudyRun:
    """What a study run needs besides the config."""

    config: StudyConfig
    out: Path
    methods: list[str] | None = None  # --methods: a subset of the config's
    max_examples_per_task: int | None = None  # --max-examples-per-task: caps every stage
    progress: Progress = field(default_factory=Progress)


def run_study(run: StudyRun) -> dict[str, Any]:
    """Run (or resume) the study; write results.json and the report; return the results.

    With several seeds (config `seeds`) every method is fitted and evaluated once per
    seed. The first seed's stages, fits and figures live in `out` as a single seed's do;
    each other seed's under `out/seeds/<seed>/`, where a stage whose key the first seed
    stored (an unfitted method's evaluation: its inputs hold no seed) is served from the
    first seed's cache. The benchmark is built once, from the config's `seed` (with
    `build_per_seed`: once per seed, into `<build.out>-seed<k>`), and the analyses run on
    the first seed (with `build_per_seed`: on each seed's own library). results.json
    keeps the single-seed layout for the first seed and adds "seeds" ({seed: "methods",
    "claims", "stages", and with `build_per_seed` "library", "analyses", "figures"}) and
    "robust_claims" (study/seeds.py's `combine`).
    """
    import torch

    from lorafuse.study.claims import claims

    cfg, out, bar = run.config, Path(run.out), run.progress
    methods = _selected(cfg, run.methods)
    caps = _caps(cfg, run.max_examples_per_task)
    _preflight(cfg, out)
    once(lambda: out.mkdir(parents=True, exist_ok=True))
    seeds = cfg.seed_list()
    bar.plan(_plan(cfg, methods, seeds))
    threads = torch.get_num_threads()
    runs: dict[int, dict[str, Any]] = {}
    first: _Context | None = None
    try:
        for seed in seeds:
            ctx = _seed_context(cfg, seed, out, caps, first, bar)
            own = first is None or cfg.build_per_seed  # a library of its own: analyse it
            r = runs[seed] = {"methods": [ctx.method(m) for m in methods]}
            r["stages"] = ctx.cache.timings
            if own:
                bar.start("analyses" + ctx.tag, None)
                r["analyses"], r["figures"] = once(ctx.analyses)
                r["library"] = library_info(ctx.ws, ctx.cfg if cfg.build_per_seed else cfg)
                bar.finish("analyses" + ctx.tag, False)
            first = first or ctx
    finally:
        torch.set_num_threads(threads)
    bar.start("report", None)
    top = runs[seeds[0]]
    results = {
        "format": FORMAT,
        "config": cfg.model_dump(mode="json"),
        "library": top["library"],
        "examples": caps,
        "methods": top["methods"],
        "analyses": top["analyses"],
        "figures": top["figures"],
        "stages": top["stages"],
    }
    results["claims"] = claims(results)
    if len(seeds) > 1:
        from lorafuse.study.seeds import add_seeds

        add_seeds(results, runs, cfg.build_per_seed)
    once(lambda: _report(results, out))  # the main process writes; its error raises in all
    bar.finish("report", False)
    return results


def _plan(cfg: StudyConfig, methods: list[MethodConfig], seeds: list[int]) -> list[str]:
    stages = []
    for i, seed in enumerate(seeds):
        tag = "" if i == 0 else f" seed {seed}"
        own = i == 0 or cfg.build_per_seed
        stages += [s + tag for s in (["build"] if cfg.build else []) + ["load"]] if own else []
        stages += [f"{m.name}@{m.experts}{tag}" for m in methods]
        stages += ["analyses" + tag] if own else []
    return stages + ["report"]


def _seed_context(cfg, seed: int, out: Path, caps, first, bar: Progress) -> _Context:
    """One seed's context: its folder, stage cache and workspace (built and loaded when it
    has a library of its own, else the first seed's workspace with a fits folder of its own)."""
    own = first is None or cfg.build_per_seed
    folder = out if first is None else out / "seeds" / str(seed)
    cache = StageCache(folder / "stages", fallback=None if own else first.cache)
    tag = "" if first is None else f" seed {seed}"
    root = cfg.library_path(seed)
    if own:
        if cfg.build:
            build_seed = seed if cfg.build_per_seed else cfg.seed
            cache.timings["build"] = once(lambda: _build(cfg, root, build_seed, bar, tag))
        bar.start("load" + tag, None)
        ws = _workspace(cfg, root, folder)
        key = setup_key(ws)
        bar.finish("load" + tag, False)
    else:
        ws, key = _with_fits(first.ws, folder / "fits"), first.setup_key
    ctx = _Context(cfg.model_copy(update={"seed": seed}), ws, folder, caps, key, cache, bar)
    ctx.tag = tag
    if not own:  # the experts' cached passes do not depend on the seed: share them
        ctx.cache_dir = first.cache_dir
    return ctx


def _selected(cfg: StudyConfig, names: list[str] | None) -> list[MethodConfig]:
    methods = cfg.method_list()
    if not names:
        return methods
    known = {m.name for m in methods}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LorafuseError(
            f"--methods names {unknown} not in the study config; it has {sorted(known)}"
        )
    return [m for m in methods if m.name in names]


def _report(results: dict[str, Any], out: Path) -> None:
    # results.json and the report beside it (the main process, under a launch).
    from lorafuse.io import write_json
    from lorafuse.study.render import render

    write_json(out / RESULTS, results)
    render(results, out)


def _preflight(cfg: StudyConfig, out: Path) -> None:
    """Check what can be checked before the study writes anything (LorafuseError)."""
    from lorafuse.devices import device
    from lorafuse.dtypes import dtype
    from lorafuse.io import check_output

    check_output(out, force=True, kind="dir")
    if cfg.device is not None:
        device(cfg.device, "device")
    if cfg.dtype is not None:
        dtype(cfg.dtype, "dtype")
    if cfg.build is None:
        from lorafuse.spec import load_spec

        for seed in cfg.seed_list()[:1] if not cfg.build_per_seed else cfg.seed_list():
            load_spec(cfg.library_path(seed))  # names a missing or unreadable library
    else:
        check_output(cfg.library_path(cfg.seed), force=True, kind="dir")


def _caps(cfg: StudyConfig, cap: int | None) -> dict[str, int | None]:
    caps = cfg.examples.model_dump()
    if cap is None:
        return caps
    if cap < 1:
        raise LorafuseError(f"--max-examples-per-task must be >= 1; got {cap}")
    return {k: cap if v is None else min(v, cap) for k, v in caps.items()}


def _build(cfg: StudyConfig, root: Path, seed: int, bar: Progress, tag: str = "") -> dict:
    """Build (or resume) the benchmark; return its timings. Its closing check is skipped
    (the study evaluates)."""
    from lorafuse.benchmark.build import MANIFEST, STAGES, build
    from lorafuse.formats.manifest import read_manifest

    assert cfg.build is not None
    start = time.perf_counter()
    bar.start("build" + tag, None)
    file = root / MANIFEST
    before = read_manifest(file).get("stages", {}) if file.is_file() else {}
    manifest = build(root, cfg.build.preset, seed, on_progress=_stage_bar(bar), evaluate=False)
    done = all(s in before for s in STAGES if s != "evaluate")
    parts = {k: v.get("seconds") for k, v in manifest["stages"].items()}
    seconds = sum(v for k, v in parts.items() if k != "evaluate" and v is not None)
    bar.finish("build" + tag, done)
    return {
        "seconds": round(seconds if done else time.perf_counter() - start, 3),
        "cached": done,
        "parts": parts,
    }


def _stage_bar(bar: Progress) -> Callable[[str, int, int], None]:
    def report(stage: str, done: int, total: int) -> None:
        bar.update(done, total)

    return report


def _workspace(cfg: StudyConfig, root: Path, out: Path):
    from lorafuse.spec import load_spec
    from lorafuse.workspace import Workspace

    spec = load_spec(root)
    spec.fits = str((out / "fits").resolve())  # the study's fits live in its folder
    return Workspace(spec, device=cfg.device, dtype=cfg.dtype)


def _with_fits(ws, fits: Path):
    """`ws` with another fits folder; the loaded model, data and experts are shared."""
    import copy

    other = copy.copy(ws)  # shallow: the cached model, tokenizer and dataset are the same
    other.spec = ws.spec.model_copy(update={"fits": str(fits.resolve())})
    return other


class _Context:
    """The shared state of one run: workspace, caps, caches, stage keys."""

    def __init__(self, cfg, ws, out, caps, setup_key, cache, bar):
        self.cfg, self.ws, self.out, self.caps = cfg, ws, Path(out), caps
        self.setup_key, self.cache, self.bar = setup_key, cache, bar  # the setup's hash
        self.cache_dir = str(Path(ws.fits_dir) / ".cache")
        self.tag = ""  # " seed <k>" on the progress of every seed but the first
        self._test_cache: dict[str, Any] = {}
        self._shapes: dict[str, Any] = {}

    # ---- methods ------------------------------------------------------------------------
    def options(self, m: MethodConfig, method) -> dict[str, Any]:
        """Fit options: the config's, over the caps and seed that the method declares."""
        study = {
            "max_examples_per_task": self.caps["fit"],
            "validation_max_per_task": self.caps["validation"],
            "seed": self.cfg.seed,
        }
        return {**{k: v for k, v in study.items() if method.declares(k)}, **m.options}

    def method(self, m: MethodConfig) -> dict[str, Any]:
        """Fit (when needed) and evaluate one method; a failure is recorded, not raised."""
        from lorafuse.methods.registry import resolve

        stage = f"{m.name}@{m.experts}{self.tag}"
        record: dict[str, Any] = {"name": m.name, "experts": m.experts, "status": "ok"}
        try:
            method, _ = resolve(m.name)
            record["family"] = method.role
            if method.origin is not None:  # beyond the paper: the report marks it
                record["origin"] = method.origin
            self.bar.start(stage, None)
            fit, fit_key, fit_seconds = self.fit(m, method)
            result, cached = self.evaluate(m, method, fit_key)
        except LorafuseError as e:
            return self._failed(record, stage, str(e))
        except Exception as e:  # a method's bug must not stop the others
            tb = traceback.format_exc(limit=3)
            return self._failed(record, stage, f"{type(e).__name__}: {e}", tb)
        answers, answers_cached = self.answers(m, fit_key)
        record.update(
            mean=result["mean"],
            se=result["se"],
            per_task={t: v["loss"] for t, v in result["per_task"].items()},
            examples=sum(v["n_examples"] for v in result["per_task"].values()),
            token_mean=result.get("token_mean"),
            settings=result["settings"],
            cost=self.cost(m, method, result["settings"]),
            seconds={"fit": fit_seconds, "eval": result["settings"].get("seconds")},
            fit=fit,
        )
        if answers is not None:
            record["answers"] = answers
            record["seconds"]["answers"] = (answers.get("settings") or {}).get("seconds")
        self.bar.finish(stage, cached and answers_cached)
        return record

    def _failed(self, record, stage, error: str, tb: str | None = None) -> dict[str, Any]:
        record.update(status="failed", error=error, mean=None, se=None, per_task={})
        if tb:
            record["traceback"] = tb
        record.setdefault("family", "unknown")
        self.bar.finish(stage, False)
        return record

    def fit(self, m: MethodConfig, method) -> tuple[dict | None, str, float | None]:
        """The method's fit (cached by its settings); for top-k variants, their parent's."""
        from lorafuse.formats.fits import fit_path
        from lorafuse.methods.registry import resolve
        from lorafuse.methods.run import fit_method

        if method.fitted_by is not None:
            parent_name = method.fitted_by
            parent = MethodConfig(name=parent_name, experts=m.experts, options=m.options)
            for other in self.cfg.method_list():  # the parent's own options, when listed
                if other.name == parent_name and other.experts == m.experts:
                    parent = other
            return self.fit(parent, resolve(parent_name)[0])
        if method.fit is None:
            return None, self.setup_key, None
        options = self.options(m, method)
        parts = [self.setup_key, "fit", FIT_RULES, m.name, m.experts, options, self.caps]
        needed = self.needed(m, method, options)
        key = stage_key(*parts, *([needed] if needed is not None else []))
        stage = f"fit:{m.name}@{m.experts}"
        fit = self.cache.get(stage, key)
        if fit is not None and once(lambda: fit_path(self.ws, m.name, m.experts).is_file()):
            return fit, key, self.cache.timings[stage]["seconds"]
        start = time.perf_counter()
        tick = _tick(self.bar)
        fitted = fit_method(self.ws, m.name, m.experts, options, tick, self.cache_dir)
        seconds = time.perf_counter() - start
        self.cache.put(stage, key, fitted.summary, seconds)
        return fitted.summary, key, round(seconds, 3)

    def needed(self, m: MethodConfig, method, options: dict[str, Any]) -> str | None:
        """The stage key of the fit that `m`'s fit reads (`Method.needs_fit`: a student's
        teacher), fitted first when the study lists it, wherever; None when it reads none."""
        from lorafuse.methods.registry import resolve

        name = method.needed_fit(method.parse_options(options))
        if name is None:
            return None
        for other in self.cfg.method_list():
            if other.name == name and other.experts == m.experts:
                return self.fit(other, resolve(name)[0])[1]
        return f"{name} (not in the study)"  # its fit raises when the file is missing

    def evaluate(self, m: MethodConfig, method, fit_key: str) -> tuple[dict, bool]:
        """The method's test result (cached by its fit and the test cap)."""
        from lorafuse.methods.run import evaluate_cached, evaluate_method

        key = stage_key(fit_key, "eval", m.name, m.experts, self.caps["test"])
        stage = f"eval:{m.name}@{m.experts}"
        stored = self.cache.get(stage, key)
        if stored is not None:  # perhaps another seed's, when nothing in it is seeded
            stored["settings"]["seed"] = self.cfg.seed
            return stored, True
        start = time.perf_counter()
        if method.weights is not None:  # a probability ensemble: score the cached passes
            result = evaluate_cached(self.ws, m.name, self.test_cache(m.experts), m.experts)
        else:
            result = evaluate_method(
                self.ws, m.name, "test", m.experts, self.caps["test"], self.bar.advance
            )
        result.settings["seed"] = self.cfg.seed
        value = result.to_dict()
        self.cache.put(stage, key, value, time.perf_counter() - start)
        return value, False

    def answers(self, m: MethodConfig, fit_key: str) -> tuple[dict | None, bool]:
        """The method's generated answers on the test subset, scored (cached by its fit,
        the answers' cap and max_new_tokens); None when the config has no `generation`.
        A failure is recorded in the answers ({"status": "failed", "error"}), not raised:
        the method's loss still stands."""
        from lorafuse.methods.run import generate_answers

        gen = self.cfg.generation
        if gen is None:
            return None, True
        cap = self.answers_cap()
        key = stage_key(fit_key, "answers", m.name, m.experts, cap, gen.max_new_tokens)
        stage = f"answers:{m.name}@{m.experts}"
        stored = self.cache.get(stage, key)
        if stored is not None:
            return stored, True
        start = time.perf_counter()
        try:
            value = generate_answers(
                self.ws, m.name, "test", m.experts, cap, gen.max_new_tokens,
                progress=self.bar.advance,
            )  # fmt: skip
        except LorafuseError as e:
            return {"status": "failed", "error": str(e)}, False
        except Exception as e:  # a bug in one method's generation must not stop the study
            return {"status": "failed", "error": f"{type(e).__name__}: {e}"}, False
        self.cache.put(stage, key, value, time.perf_counter() - start)
        return value, False

    def answers_cap(self) -> int | None:
        """Answers per task: the config's `generation.examples`, at most the test cap."""
        gen, test = self.cfg.generation, self.caps["test"]
        if gen is None or gen.examples is None:
            return test
        return gen.examples if test is None else min(gen.examples, test)

    def test_cache(self, kind: str):
        """Every `kind` expert's target log-probabilities on the test subset (one pass)."""
        from lorafuse.cache import expert_target_logprobs
        from lorafuse.methods.ensembles import ROWS_PER_PASS

        if kind not in self._test_cache:
            self._test_cache[kind] = expert_target_logprobs(
                self.ws, kind, "test", self.caps["test"], ROWS_PER_PASS, self.cache_dir,
                self.bar.advance,
            )  # fmt: skip
        return self._test_cache[kind]

    def cost(self, m: MethodConfig, method, settings: dict) -> dict[str, Any]:
        """Passes and added FLOPs per token of the evaluated method (as it declares)."""
        from lorafuse.study.cost import library_shapes, method_cost

        kind = method.experts or m.experts
        if kind not in self._shapes:
            self._shapes[kind] = library_shapes(self.ws.model, self.ws.library(kind))
        return method_cost(method.cost, settings, self._shapes[kind])

    # ---- analyses -----------------------------------------------------------------------
    def analyses(self) -> tuple[dict[str, Any], dict[str, str]]:
        """Cluster heat map, connectivity curves, greedy selection (each cached)."""
        from lorafuse.study.analyses import run_analyses

        return run_analyses(self)


def _tick(bar: Progress) -> Callable[..., None]:
    """A fit's progress callback: progress(n) counts n units, progress(step, loss) one."""

    def tick(*args) -> None:
        bar.advance(int(args[0]) if len(args) == 1 else 1)

    return tick
