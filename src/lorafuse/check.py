"""Check a proposed expert library without loading it (`lorafuse info --check`).

Per expert: its recorded base model, the modules it covers, rank, alpha, scaling, and
every reason `ExpertLibrary.load` would refuse it. Only configs and weight-file headers
are read (safetensors keeps tensor shapes in its header), so hundreds of experts check
in seconds; values inside the tensors (NaN, Inf) are checked when the library loads.
With a base model, each adapted module must exist in it with the same shape (the model
is built on torch's meta device: no weights are read).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lorafuse.errors import LorafuseError
from lorafuse.formats.peft import read_config, same_base
from lorafuse.library import expert_dirs, read_shapes, unique_names


@dataclass
class ExpertCheck:
    """What `check_experts` found for one expert."""

    name: str
    path: Path
    source: str | None = None  # the hub id (None: a local folder)
    base_model: str | None = None
    modules: list[str] = field(default_factory=list)  # full module paths it adapts
    ranks: list[int] = field(default_factory=list)  # distinct ranks over its modules
    alpha: float | None = None
    scalings: list[float] = field(default_factory=list)  # distinct scalings
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the expert can be fused with the others."""
        return not self.problems


def base_shapes(base: str | Path) -> dict[str, tuple[int, int]]:
    """module path -> (in, out) of every Linear / Conv1D of a transformers model, from its
    config alone (built on the meta device). LorafuseError when it cannot be read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorafuse.layer import base_shape

    try:
        cfg = AutoConfig.from_pretrained(str(base))
    except Exception as e:  # missing folder, no config.json, unknown id offline
        raise LorafuseError(
            f"--base {base}: cannot read its config.json ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); give a transformers model folder "
            "or a cached hub id"
        ) from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            shapes[name] = base_shape(mod)
    return shapes


def check_experts(
    paths: Sequence[str | Path],
    base: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ExpertCheck]:
    """One ExpertCheck per expert of `paths` (folders, hub ids, .txt lists).

    `progress(1)` is called after each hub id is fetched. Raises LorafuseError only
    when `paths` cannot be resolved to experts at all (a missing folder, an unreachable
    id) or the base model cannot be read.
    """
    dirs, labels, sources = expert_dirs(paths, progress)
    names = unique_names(labels)
    known = base_shapes(base) if base is not None else None
    first_shape: dict[str, tuple[str, int, int]] = {}  # module -> (expert, in, out)
    ref_base = (str(base), "--base") if base is not None else None
    ref_fan: tuple[str, bool] | None = None
    out = []
    for d, n, src in zip(dirs, names, sources):
        c = ExpertCheck(n, d, src)
        out.append(c)
        try:
            cfg = read_config(d)
        except LorafuseError as e:
            c.problems.append(str(e))
            cfg = None
        try:
            shapes = read_shapes(d, n)
        except LorafuseError as e:
            c.problems.append(str(e))
            shapes = {}
        c.problems += _shape_problems(n, shapes, known, first_shape)
        if cfg is None:
            continue
        c.base_model, c.alpha = cfg.base_model, cfg.lora_alpha
        c.modules = list(shapes)
        c.ranks = sorted({a[0] for a, _ in shapes.values()})
        c.scalings = sorted({round(cfg.scaling(m), 6) for m in shapes})
        if ref_base is None and cfg.base_model:
            ref_base = (cfg.base_model, f"expert {n}")
        elif ref_base is not None and not same_base(ref_base[0], cfg.base_model):
            c.problems.append(
                f"trained on base model {cfg.base_model!r}, but {ref_base[1]} names {ref_base[0]!r}"
            )
        if ref_fan is None:
            ref_fan = (n, cfg.fan_in_fan_out)
        elif cfg.fan_in_fan_out != ref_fan[1]:
            c.problems.append(
                f"fan_in_fan_out={cfg.fan_in_fan_out} differs from expert {ref_fan[0]}'s"
            )
        for m, (a, _b) in shapes.items():
            r_cfg, _ = cfg.rank_alpha(m)
            if r_cfg != a[0]:
                c.problems.append(
                    f"module {m}: adapter_config.json gives rank {r_cfg}, the tensors {a[0]}"
                )
    return out


def _shape_problems(name, shapes, known, first_shape) -> list[str]:
    # Each module's (in, out) against the base model's, else against the first expert
    # adapting it; one line per kind of problem, with one example module.
    absent, wrong, differ = [], [], []
    for m, (a, b) in shapes.items():
        D, O = a[1], b[0]
        if known is not None:
            if m not in known:
                absent.append(m)
            elif known[m] != (D, O):
                wrong.append(f"{m}: in={D} out={O}, the base model's in={known[m][0]} "
                             f"out={known[m][1]}")  # fmt: skip
            continue
        who, D0, O0 = first_shape.setdefault(m, (name, D, O))
        if (D, O) != (D0, O0):
            differ.append(f"{m}: in={D} out={O}, expert {who}'s in={D0} out={O0}")
    out = []
    if absent:
        out.append(
            f"{len(absent)} of its {len(shapes)} modules are not Linear/Conv1D layers of the "
            f"base model (e.g. {absent[0]}); trained on another architecture?"
        )
    for what, items in (("the base model's", wrong), ("another expert's", differ)):
        if items:
            out.append(f"{len(items)} modules differ in shape from {what} (e.g. {items[0]})")
    return out
