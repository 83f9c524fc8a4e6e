"""A study's configuration: one validated YAML file (the presets are such files).

    name: small
    seed: 0                                   # the build's seed, and the fits' by default
    seeds: [0, 1, 2]                          # optional: fits and evaluations per seed
    build_per_seed: false                     # optional: one build per seed, <out>-seed<k>
    build: {preset: small, out: runs/small}   # or `library:` a built folder / a YAML spec
    experts: mbc                              # the kind Figure 2's methods mix (the paper:
                                              #   its 10 MBC cluster experts)
    private_experts: private                  # Section 5's kind: HC, connectivity,
                                              #   refactoring, greedy; Figure 4's other side
    examples: {fit: 16, validation: 8, test: 20}   # caps per task (null: all)
    generation: {examples: 10, max_new_tokens: 32}  # answers per task (null: off)
    fit_defaults: {lr_grid: [0.001], max_steps: 40}
    methods:
      - base
      - {name: route-sgd, options: {max_steps: 60}}
      - {name: oracle, experts: private}
    analyses: {clusters: 8, connectivity: {pairs: auto, alphas: 11}, greedy: true}

Unknown keys are rejected naming the key and its line; relative paths are read against
the config file's folder (for a shipped preset: the current folder).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from lorafuse.errors import LorafuseError


def _shipped() -> tuple[str, ...]:
    """The shipped presets: every YAML file in study/presets/, the four sizes first."""
    folder = resources.files("lorafuse.study").joinpath("presets")
    names = sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))
    sizes = [n for n in ("micro", "tiny", "small", "full") if n in names]
    return (*sizes, *(n for n in names if n not in sizes))


PRESETS = _shipped()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BuildConfig(_Strict):
    """Build a synthetic benchmark first (`lorafuse benchmark build`) and study it."""

    preset: str
    out: str


class Examples(_Strict):
    """Examples per task used by each stage (null: every example of the split)."""

    fit: int | None = Field(None, gt=0)
    validation: int | None = Field(None, gt=0)
    test: int | None = Field(None, gt=0)


class Generation(_Strict):
    """Generated answers of every method (exact match, Rouge-L), beside the test loss:
    `examples` per task (at most the test cap; null: the test cap), `max_new_tokens` the
    most tokens of an answer (each task's cap comes from its data). `generation: null`
    in a config switches them off."""

    examples: int | None = Field(10, gt=0)
    max_new_tokens: int = Field(32, gt=0)


class MethodConfig(_Strict):
    """One method to run: its name (`name:arg` allowed), expert kind and fit options."""

    name: str
    experts: str | None = None  # default: the study's `experts`
    options: dict[str, Any] = Field(default_factory=dict)


class Connectivity(_Strict):
    """Mode-connectivity curves: `auto` picks same- and cross-family pairs."""

    pairs: str | list[list[str]] = "auto"
    alphas: int = Field(11, ge=2)
    max_pairs: int = Field(4, ge=1)

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, v):
        if isinstance(v, str) and v != "auto":
            raise ValueError("pairs must be 'auto' or a list of [expert_a, expert_b]")
        if isinstance(v, list) and any(len(p) != 2 for p in v):
            raise ValueError("each pair must name exactly two experts")
        return v


class Analyses(_Strict):
    """The analyses next to the method table (each can be switched off)."""

    clusters: int | None = Field(None, ge=1)  # k of the cluster heat map (null: the default)
    connectivity: Connectivity | None = Field(default_factory=Connectivity)
    greedy: bool = True


class StudyConfig(_Strict):
    """Everything a study depends on; the stages' cache keys are made from it."""

    name: str = "study"
    seed: int = 0  # the build's seed; the fits' too unless `seeds` is given
    seeds: list[int] | None = None  # fit and evaluate once per seed (null: [seed])
    library: str | None = None
    build: BuildConfig | None = None
    build_per_seed: bool = False  # build one benchmark per seed into <build.out>-seed<k>
    experts: str = "private"  # the kind methods mix by default (Figure 2's)
    private_experts: str = "private"  # Section 5's kind (HC methods, the analyses)
    device: str | None = None
    dtype: str | None = None
    examples: Examples = Field(default_factory=Examples)
    generation: Generation | None = Field(default_factory=Generation)
    fit_defaults: dict[str, Any] = Field(default_factory=dict)
    methods: list[MethodConfig]
    analyses: Analyses = Field(default_factory=Analyses)
    root: str = "."  # the folder relative paths are read against

    @field_validator("methods", mode="before")
    @classmethod
    def _names(cls, v):
        """A bare name stands for {name: <name>}."""
        if isinstance(v, list):
            return [{"name": m} if isinstance(m, str) else m for m in v]
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if v is not None and not v:
            raise ValueError("seeds must list at least one seed (or be left out)")
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct; got {v}")
        if v is not None and min(v) < 0:
            raise ValueError(f"seeds must be >= 0; got {v}")
        return v

    @field_validator("build_per_seed")
    @classmethod
    def _per_seed(cls, v, info: ValidationInfo):
        if v and info.data.get("build") is None:
            raise ValueError("build_per_seed needs a `build:` entry (the benchmark to build)")
        return v

    def seed_list(self) -> list[int]:
        """The seeds the fits and evaluations run with: `seeds`, else [seed]."""
        return list(self.seeds) if self.seeds else [self.seed]

    def library_path(self, seed: int | None = None) -> Path:
        """The benchmark folder or library spec to study (with `build_per_seed`: the
        one built for `seed`, `<build.out>-seed<seed>`; `seed` defaults to the first)."""
        if self.build is not None and self.build_per_seed:
            k = self.seed_list()[0] if seed is None else seed
            return self.path(f"{self.build.out}-seed{k}")
        if self.build is not None:
            return self.path(self.build.out)
        if self.library is None:
            raise LorafuseError("a study config needs `library:` (a folder or spec) or `build:`")
        return self.path(self.library)

    def path(self, value: str) -> Path:
        """`value` against the config's folder unless absolute."""
        p = Path(value)
        return p if p.is_absolute() else Path(self.root) / p

    def kind_of(self, study_experts: str) -> str:
        """The study's kind for a method's `study_experts` ("cluster": `experts`,
        "private": `private_experts`)."""
        return self.private_experts if study_experts == "private" else self.experts

    def method_list(self) -> list[MethodConfig]:
        """The methods as MethodConfig, kinds filled in (a method's own `experts`, else
        the kind its table row names: `experts`, or `private_experts` for HC), under their
        options the fit defaults each method declares (a default it has no option for does
        not reach it)."""
        out = []
        for m in self.methods:
            method = _method(m.name)
            declares = method.declares if method else (lambda key: True)
            defaults = {k: v for k, v in self.fit_defaults.items() if declares(k)}
            options = {**defaults, **m.options}
            kind = m.experts or self.kind_of(method.study_experts if method else "cluster")
            out.append(MethodConfig(name=m.name, experts=kind, options=options))
        return out


def _method(name: str):
    """The table row of method `name` (None for an unknown name: it fails later)."""
    from lorafuse.methods.registry import resolve

    try:
        return resolve(name)[0]
    except LorafuseError:
        return None


def load_config(source: str | Path) -> StudyConfig:
    """Read and validate a study config (YAML); LorafuseError names the bad key and line."""
    from lorafuse.formats.schema import read_text
    from lorafuse.spec import explain, parse_yaml

    src = Path(source)
    if not src.is_file():
        raise LorafuseError(f"study config {src} does not exist")
    data, lines = parse_yaml(read_text(src, what="study config"), src)
    if not isinstance(data, dict):
        raise LorafuseError(f"{src}: a study config must be a mapping of keys to values")
    data.setdefault("root", str(src.parent))
    try:
        config = StudyConfig(**data)
    except ValidationError as e:
        raise LorafuseError(explain(e, src, lines, StudyConfig)) from None
    _check_methods(config, src, lines)
    return config


def preset_config(preset: str) -> StudyConfig:
    """The shipped study config of a benchmark preset (builds into runs/<preset>)."""
    if preset not in PRESETS:
        raise LorafuseError(f"unknown study preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = StudyConfig(**_preset_data(preset))
    _check_methods(config, Path(f"{preset}.yaml"), {})
    return config


def _preset_data(preset: str) -> dict[str, Any]:
    # A shipped preset may start from another (`like: small`) and override its keys.
    from lorafuse.spec import parse_yaml

    text = resources.files("lorafuse.study").joinpath(f"presets/{preset}.yaml").read_text()
    data, _ = parse_yaml(text, Path(f"{preset}.yaml"))
    parent = data.pop("like", None)
    return {**_preset_data(parent), **data} if parent else data


def _check_methods(config: StudyConfig, src: Path, lines: dict[str, int]) -> None:
    """Every method known and its options valid: LorafuseError names the method, the bad
    key, the allowed keys and the YAML line. A method whose fit reads another's
    (`Method.needs_fit`: a student's teacher) needs that one in the study, over the same
    experts. A fit default must be an option of one of the study's methods (else it is a
    typo that would be silently ignored)."""
    from pydantic import ValidationError

    from lorafuse.methods.registry import resolve

    def where(*keys: str) -> str:
        line = next((lines[k] for k in keys if k in lines), None)
        return f" (line {line})" if line else ""

    methods = []
    for i, m in enumerate(config.methods):
        try:
            method = resolve(m.name)[0]
        except LorafuseError as e:
            raise LorafuseError(
                f"{src}: methods.{i}{where(f'methods.{i}.name', f'methods.{i}')}: {e}"
            ) from None
        methods.append(method)
        defaults = {k: v for k, v in config.fit_defaults.items() if method.declares(k)}
        for own, values in ((False, defaults), (True, config.method_list()[i].options)):
            try:  # the defaults alone first: a bad default is one even where overridden
                method.options(**values)
            except ValidationError as e:
                key, text = method.problems(e)[0]
                own = own and key in m.options
                path = f"methods.{i}.options.{key}" if own else f"fit_defaults.{key}"
                near = where(path, f"methods.{i}.options", f"methods.{i}") if own else where(path)
                raise LorafuseError(f"{src}: {path}{near}: {text} ({method.allowed()})") from None
    listed = config.method_list()
    for i, (m, method) in enumerate(zip(listed, methods, strict=True)):
        needed = method.needed_fit(method.options(**m.options))
        if needed and not any(o.name == needed and o.experts == m.experts for o in listed):
            raise LorafuseError(
                f"{src}: methods.{i}{where(f'methods.{i}.name', f'methods.{i}')}: {m.name} "
                f"over the {m.experts} experts reads the fit of {needed}: list {needed} over "
                f"the {m.experts} experts in the study too (or change {m.name}'s options)"
            )
    for key in config.fit_defaults:
        if not any(method.declares(key) for method in methods):
            known = sorted({k for method in methods for k in method.option_names()})
            raise LorafuseError(
                f"{src}: fit_defaults.{key}{where(f'fit_defaults.{key}')}: no method of the "
                f"study has the option {key!r} (options of its methods: {', '.join(known)})"
            )


def with_seeds(config: StudyConfig, seeds: list[int]) -> StudyConfig:
    """`config` with `seeds` replaced, validated (LorafuseError names the problem)."""
    try:
        return StudyConfig(**{**config.model_dump(), "seeds": seeds})
    except ValidationError as e:
        raise LorafuseError("--seeds: " + "; ".join(x["msg"] for x in e.errors())) from None
