"""What a method is: its declaration (name, role, options, cost) and what it returns.

A method is a row of the table in `methods/registry.py`. `prepare(ctx)` turns a Context
(workspace, experts, validated options) into a `Prepared` forward; `fit(ctx)`, when the
method learns something, returns a `Fitted`. Nothing registers itself: the table lists
every method explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from pydantic import ValidationError
from torch import Tensor

from lorafuse.errors import LorafuseError
from lorafuse.fit.options import Options

Role = Literal["baseline", "ensembling", "merging", "routing"]
ROLES: tuple[Role, ...] = ("baseline", "ensembling", "merging", "routing")
# Where the paper shows a method: Figure 2 (the main comparison), Figure 4 (private vs
# cluster experts) and the appendices' variants (B.2 full-rank merging, B.3 logits, B.4
# top-k routing, B.5 the minimax LP). A method with no tag is lorafuse's own or context.
Tag = Literal["fig2", "fig4", "B.2", "B.3", "B.4", "B.5"]
TAGS: tuple[Tag, ...] = ("fig2", "fig4", "B.2", "B.3", "B.4", "B.5")
# Which of a study's two expert kinds a method mixes when the study does not say: the
# cluster experts (Sections 3-4: Figure 2 and the appendices) or the private experts
# (Section 5: HC clusters the private experts).
StudyExperts = Literal["cluster", "private"]


class NoOptions(Options):
    """A method with nothing to set."""


@dataclass
class Context:
    """What a method's prepare and fit receive.

    `ws` the workspace, `name` the method as called (`ensemble-sparse:4`), `kind` the
    experts, `arg` the part after the colon, `options` the method's validated options,
    `progress` a callback of the fit, `cache_dir` the cached expert passes' folder.
    """

    ws: Any
    name: str
    kind: str
    arg: str | None = None
    options: Any = field(default_factory=NoOptions)
    progress: Callable[..., None] | None = None
    cache_dir: str | None = None

    @cached_property
    def library(self):
        """The `kind` experts (an ExpertLibrary), loaded once."""
        return self.ws.library(self.kind)

    @property
    def model(self):
        """The base model."""
        return self.ws.model

    @property
    def cache(self) -> str:
        """The folder of cached expert passes (default `<fits>/.cache`)."""
        return self.cache_dir or f"{self.ws.fits_dir}/.cache"


@dataclass
class Prepared:
    """A ready-to-run method: `forward(batch) -> logits (B, T, V)` and a clean-up.

    `decoder(tasks) -> Decoder` (lorafuse.generate) generates with the method, given the
    task of each row of a batch of prompts; None (the default) generates with the
    workspace's model as the method set it up (base, merged, routed, one expert), which
    is right for every method whose forward is that model's. An oracle (coefficients per
    row from the tasks) and an output-level ensemble give their own.

    A context manager: `with method.prepare(ctx) as prepared:` closes it (detaches the
    experts it attached) on every exit path.
    """

    forward: Callable[[Any], Tensor]
    close: Callable[[], None] = lambda: None
    passes: int = 1  # forward passes of the base model per token at inference
    info: dict[str, Any] = field(default_factory=dict)
    decoder: Callable[[list[str]], Any] | None = None

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Fitted:
    """A fit's result: `summary`, what a study records of it (results.json), and `detail`,
    saved with the summary in the fit file only (histories of state, labels, settings)."""

    summary: dict[str, Any]
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def payload(self) -> dict[str, Any]:
        """The fit file's content: summary and detail together."""
        return {**self.summary, **self.detail}

    def __getitem__(self, key: str) -> Any:
        """A value of the fit file (summary or detail), as `load_fit(...)[key]` reads it."""
        return self.payload[key]

    def get(self, key: str, default: Any = None) -> Any:
        """A value of the fit file, or `default`."""
        return self.payload.get(key, default)


@dataclass(frozen=True)
class Cost:
    """Inference cost per token, as study/cost.py counts it (relative to the base model).

    `experts`: LoRAs applied in every fused module per pass: 0, 1, "top_k" (the
    evaluation's top_k, else all N) or "clusters" (the fit's C merged clusters).
    `router`: a linear router per module over "experts" (N outputs) or "clusters" (C).
    `folded`: a merge folded into the weights (costs nothing). `passes`: "per expert"
    when the model runs once per expert with a nonzero weight (the evaluation's passes).
    """

    experts: Literal[0, 1, "top_k", "clusters"] = 1
    router: Literal["experts", "clusters"] | None = None
    folded: bool = False
    passes: Literal[1, "per expert"] = 1

    def describe(self) -> str:
        """A short phrase for the method table, e.g. 'router + top-k experts'."""
        if self.folded:
            return "merge folded into the weights"
        if self.experts == 0:
            return "the base model"
        if self.passes == "per expert":
            return "one pass per expert"
        if self.router == "clusters":
            return "router over merged clusters"
        if self.router == "experts":
            return "router + top-k experts" if self.experts == "top_k" else "router"
        return "one LoRA"


@dataclass(frozen=True)
class Method:
    """A named fusion strategy (or baseline): one row of the method table.

    `prepare(ctx) -> Prepared`; `fit(ctx) -> Fitted` when it learns something;
    `fitted_by` names the method whose fit it evaluates (a top-k variant); `needs_fit(options)`
    names the method (over the same experts) whose saved fit its own fit reads, or None (a
    distillation's teacher): a study fits that one first and keys this fit on it; `weights(ctx)
    -> (N,)` for a probability-level ensemble (scored from cached passes); `experts` a
    fixed expert kind (the shared expert) instead of the caller's; `paper` the figures
    and appendices of the paper that show it (the claims select methods by role and tag);
    `study_experts` which of a study's kinds it mixes by default (cluster or private);
    `origin` where a method beyond the paper comes from ("PEFT / mergekit", "LoraHub"):
    the report marks it "beyond the paper" (None: the paper's, or lorafuse's context).
    """

    name: str
    role: Role
    description: str
    prepare: Callable[[Context], Prepared]
    options: type[Options] = NoOptions
    fit: Callable[[Context], Fitted] | None = None
    cost: Cost = Cost()
    needs_arg: bool = False
    fitted_by: str | None = None
    needs_fit: Callable[[Any], str | None] | None = None
    weights: Callable[[Context], Tensor] | None = None
    experts: str | None = None
    paper: tuple[Tag, ...] = ()
    study_experts: StudyExperts = "cluster"
    origin: str | None = None

    def needed_fit(self, options: Options) -> str | None:
        """The method whose fit this method's fit reads, given its options (or None)."""
        return self.needs_fit(options) if self.needs_fit is not None else None

    def option_names(self) -> list[str]:
        """The option keys this method declares."""
        return list(self.options.model_fields)

    def declares(self, key: str) -> bool:
        """True when `key` is one of the method's options."""
        return key in self.options.model_fields

    def parse_options(self, values: dict[str, Any] | None = None) -> Options:
        """`values` validated against the options model; LorafuseError names the method,
        each bad key and the allowed keys."""
        try:
            return self.options(**(values or {}))
        except ValidationError as e:
            problems = "; ".join(text for _, text in self.problems(e))
            raise LorafuseError(f"{problems} ({self.allowed()})") from None

    def problems(self, e: ValidationError) -> list[tuple[str, str]]:
        """(key, what is wrong with it) for each error of a validation of the options."""
        out = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                out.append((key, f"method {self.name} has no option {key!r}"))
            else:
                out.append((key, f"method {self.name}: option {key!r}: {err['msg']}"))
        return out

    def allowed(self) -> str:
        """'allowed options: a, b, c' (or 'it has no options')."""
        names = self.option_names()
        return f"allowed options: {', '.join(names)}" if names else "it has no options"
