"""A Flan-like synthetic task suite, deterministic from a seed.

Each task is (family, operation, format, template set) and has several prompt templates,
the way a Flan dataset has many templates; rows follow the flan-flat schema (see
`data.flan`). The instruction names the operation in words the base model never saw: its
pretraining examples (`pretraining_examples`) name the same operations by opaque codes
instead, so the base model knows every skill but not which one a task's instruction asks
for.

Three designs make a preset's library (`Preset.design`); two lay out its tasks:
- "interference": the tasks of a family are different operations or formats on the same
  inputs, so they conflict (only the instruction tells them apart);
- "transfer" (Flan-like): a family's tasks come in pairs that are two template sets of one
  skill (operation and format: the same answers, like Flan's several tasks made from one
  dataset), and the pairs conflict with each other. The second template set of the first
  pair of every family is a low-resource task (`Preset.low_resource` of the training examples), as
  Flan's task sizes vary: its own expert sees little data, so its sibling's expert can do
  better on it. See `family_tasks` for the exact order.
- "replay": the tasks of "transfer", with experts that forget little: each expert batch
  replays the base model's pretraining data (`benchmark.build.REPLAY_SHARE`), so an expert
  stays close to the base model off its own tasks (as the paper's Phi-2 experts do).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lorafuse.data.errors import DataError
from lorafuse.data.families import FAMILIES, FORMATS, Family, Format, Op

LAYOUTS = (
    "{instr}{fmt}: {input}",
    "{instr}{fmt}.\nInput: {input}",
    "{instr} ({opts}){fmt}: {input}",
)
# The second template set of a skill (a near-duplicate task): other wording around the
# same instruction and input, the input still last; its second template is the first
# set's second one (templates of one dataset overlap, as in Flan).
LAYOUTS_V1 = (
    "Question: {instr}{fmt}?\nText: {input}",
    LAYOUTS[1],
    "Question: {instr}{fmt}? Options: {opts}.\nText: {input}",
)
DESIGNS = ("interference", "transfer", "replay")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Preset:
    """How many families, tasks per family and examples per task a suite has."""

    name: str
    families: int
    tasks_per_family: int
    examples_per_task: int
    design: str = "transfer"  # one of DESIGNS
    low_resource: float = 0.08  # share of the training examples a low-resource task has

    def __post_init__(self) -> None:
        if self.design not in DESIGNS:
            raise DataError(f"preset {self.name}: design {self.design!r} is not one of {DESIGNS}")
        if not 0 < self.low_resource <= 1:
            raise DataError(f"preset {self.name}: low_resource must lie in (0, 1]")


PRESETS = {
    "micro": Preset("micro", 2, 2, 60, design="interference"),
    "tiny": Preset("tiny", 4, 2, 300),
    "tiny-interference": Preset("tiny-interference", 4, 2, 300, design="interference"),
    "tiny-replay": Preset("tiny-replay", 4, 2, 300, design="replay", low_resource=0.01),
    # small: the design closest to the paper's library on the three structure statistics
    # (benchmark.structure); the other designs stay for the regime comparison
    "small": Preset("small", 8, 4, 1000, design="replay", low_resource=0.01),
    "small-transfer": Preset("small-transfer", 8, 4, 1000),
    "small-interference": Preset("small-interference", 8, 4, 1000, design="interference"),
    "full": Preset("full", 8, 32, 1000),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; raise DataError listing the known presets otherwise."""
    if name not in PRESETS:
        raise DataError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class Task:
    """One task of the suite: an operation of a family written in one format."""

    family: Family
    op: Op
    format: Format
    variant: int = 0  # which template set: 0 (LAYOUTS) or 1 (LAYOUTS_V1)
    share: float = 1.0  # share of the preset's examples per task this task has

    @property
    def skill(self) -> str:
        """'<family>_<operation>_<format>': tasks of one skill want the same answers."""
        return f"{self.family.name}_{self.op.name}_{self.format.name}"

    @property
    def name(self) -> str:
        """The task_name column: the skill, with '_v1' for the second template set."""
        return self.skill + (f"_v{self.variant}" if self.variant else "")

    def split_sizes(self, per_task: int) -> tuple[int, int, int]:
        """(train, validation, test) example counts when a preset gives `per_task`: 80/10/10,
        a low-resource task having `share` of the training examples (at least one) and
        validation and test splits of the usual size, so it is evaluated as well as any."""
        n_train, n_val = round(0.8 * per_task), round(0.1 * per_task)
        return max(1, round(n_train * self.share)), n_val, per_task - n_train - n_val

    @property
    def templates(self) -> int:
        """How many prompt templates the task has (one more when it lists options)."""
        return 3 if self.op.options else 2

    def source(self, text: str, template_idx: int) -> str:
        """The prompt for input `text` written with template `template_idx`."""
        instr = self.op.phrases[template_idx % len(self.op.phrases)]
        opts = "/".join(self.op.options or ())
        layouts = LAYOUTS_V1 if self.variant else LAYOUTS
        return layouts[template_idx].format(
            instr=instr, fmt=self.format.phrase, input=text, opts=opts
        )

    def target(self, payload) -> str:
        """The expected answer for an input's payload."""
        return self.format.wrap(self.op.fn(payload))

    def describe(self) -> dict:
        """Name, family, operation and format, as recorded in the manifest."""
        return {
            "name": self.name,
            "family": self.family.name,
            "kind": self.family.kind,
            "operation": self.op.name,
            "format": self.format.name,
            "skill": self.skill,
            "variant": self.variant,
            "examples_share": self.share,
            "templates": self.templates,
        }


def _skills(index: int) -> list[tuple[Op, Format]]:
    # A family's (operation, format) pairs in a fixed order: two operations in one format
    # first (they conflict), then the first operation in a second format (close to the
    # first), then the rest.
    family = FAMILIES[index]
    formats = FORMATS[index % len(FORMATS) :] + FORMATS[: index % len(FORMATS)]
    combos = [(o, f) for f in range(len(formats)) for o in range(len(family.ops))]
    head = [(0, 0), (1, 0), (0, 1), (2, 0)]
    order = head + [c for c in combos if c not in head]
    return [(family.ops[o], formats[f]) for o, f in order]


def family_tasks(
    index: int, count: int, design: str = "interference", low_resource: float = 1.0
) -> list[Task]:
    """The first `count` tasks of family `index`, in a fixed order.

    "interference": one task per skill, in the order of `_skills`. "transfer": skills
    are taken two at a time (a, b), each in both template sets, as a0 a1 b0 b1 in even
    families and a0 b0 a1 b1 in odd ones (so a preset with two tasks per family has
    near-duplicate pairs in half its families and conflicting pairs in the other half);
    a1 of the first pair has `low_resource` of the training examples. Raises DataError when the
    family has too few skills.
    """
    family, skills = FAMILIES[index], _skills(index)
    if design == "interference":
        order = [Task(family, op, fmt) for op, fmt in skills]
    else:
        order = []
        for j in range(0, len(skills) - 1, 2):
            (oa, fa), (ob, fb) = skills[j], skills[j + 1]
            share = low_resource if j == 0 else 1.0
            a0, a1 = Task(family, oa, fa), Task(family, oa, fa, 1, share)
            b0, b1 = Task(family, ob, fb), Task(family, ob, fb, 1)
            order += [a0, a1, b0, b1] if index % 2 == 0 else [a0, b0, a1, b1]
    if count > len(order):
        raise DataError(f"family {family.name} has only {len(order)} tasks; asked for {count}")
    return order[:count]


def make_tasks(preset: str | Preset) -> list[Task]:
    """All tasks of a preset, family by family. Raises DataError for an unknown preset."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    if p.families > len(FAMILIES):
        raise DataError(f"preset {p.name} wants {p.families} families; there are {len(FAMILIES)}")
    return [
        t
        for i in range(p.families)
        for t in family_tasks(i, p.tasks_per_family, p.design, p.low_resource)
    ]


def select_tasks(tasks: list[Task], names: list[str] | None) -> list[Task]:
    """The tasks called `names` (all when None); raise DataError naming unknown ones."""
    if names is None:
        return tasks
    by_name = {t.name: t for t in tasks}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        known = sorted(by_name)
        more = f" and {len(known) - 12} more" if len(known) > 12 else ""
        raise DataError(
            f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(known[:12])}{more}"
        )
    return [by_name[n] for n in names]


def task_rows(task: Task, per_task: int, seed: int) -> list[dict]:
    """The examples of `task` as flan-flat rows, distinct prompts split as
    `task.split_sizes(per_task)` (the training examples are drawn first).

    Deterministic in (task, per_task, seed). Raises DataError when the task's inputs
    cannot give that many distinct prompts.
    """
    sizes = task.split_sizes(per_task)
    n = sum(sizes)
    rng = random.Random(f"lorafuse:{seed}:{task.name}")
    seen: dict[str, dict] = {}
    attempts = 0
    while len(seen) < n:
        attempts += 1
        if attempts > 20 * n:
            raise DataError(f"task {task.name} cannot give {n} distinct examples; ask for fewer")
        text, payload = task.family.draw(rng)
        t = rng.randrange(task.templates)
        source = task.source(text, t)
        if source in seen:
            continue
        seen[source] = {
            "source": source,
            "target": task.target(payload),
            "task_name": task.name,
            "task_source": task.family.name,
            "template_type": "zs_opt" if t == 2 else "zs_noopt",
            "template_idx": t,
        }
    rows = list(seen.values())
    n_train, n_val = sizes[0], sizes[1]
    for i, row in enumerate(rows):
        row["split"] = SPLITS[(i >= n_train) + (i >= n_train + n_val)]
    return rows


def generate(tasks: list[Task], examples_per_task: int, seed: int) -> list[dict]:
    """Flan-flat rows for every task (see `task_rows`), task by task; a task has
    `task.split_sizes(examples_per_task)` examples (fewer training examples for a
    low-resource task)."""
    if examples_per_task < 10:
        raise DataError(
            f"examples_per_task must be at least 10 (one per split); got {examples_per_task}"
        )
    return [row for task in tasks for row in task_rows(task, examples_per_task, seed)]


def pretraining_examples(
    families: int, n: int, seed: int, shuffled: float = 0.25
) -> list[tuple[str, str]]:
    """`n` (source, target) pairs that teach the base model every skill but no task.

    Most examples name an operation and format of the first `families` families by an
    opaque code ('#<f><o><k> <input>'), so the skill is learned without the words tasks
    use. A fraction `shuffled` are written like task prompts but answered by another,
    random operation and format of the family: the base model learns the prompt style and
    the family of answers, not which answer an instruction asks for.
    """
    rng = random.Random(f"lorafuse-pretrain:{seed}")
    out = []
    for _ in range(n):
        fi = rng.randrange(families)
        family = FAMILIES[fi]
        oi, ki = rng.randrange(len(family.ops)), rng.randrange(len(FORMATS))
        text, payload = family.draw(rng)
        target = FORMATS[ki].wrap(family.ops[oi].fn(payload))
        if rng.random() < shuffled:
            decoy = Task(family, rng.choice(family.ops), rng.choice(FORMATS))
            out.append((decoy.source(text, rng.randrange(decoy.templates)), target))
        else:
            out.append((f"#{fi}{oi}{ki} {text}", target))
    return out
