"""A Flan-like synthetic task suite, deterministic from a seed.

Each task is (family, operation, format) and has several prompt templates, the way a
Flan dataset has many templates; rows follow the flan-flat schema (see `data.flan`).
The instruction names the operation in words the base model never saw: its pretraining
examples (`pretraining_examples`) name the same operations by opaque codes instead, so
the base model knows every skill but not which one a task's instruction asks for.
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
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Preset:
    """How many families, tasks per family and examples per task a suite has."""

    name: str
    families: int
    tasks_per_family: int
    examples_per_task: int


PRESETS = {
    "micro": Preset("micro", 2, 2, 60),
    "tiny": Preset("tiny", 4, 2, 300),
    "small": Preset("small", 8, 4, 1000),
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

    @property
    def name(self) -> str:
        """The task_name column: '<family>_<operation>_<format>'."""
        return f"{self.family.name}_{self.op.name}_{self.format.name}"

    @property
    def templates(self) -> int:
        """How many prompt templates the task has (one more when it lists options)."""
        return 3 if self.op.options else 2

    def source(self, text: str, template_idx: int) -> str:
        """The prompt for input `text` written with template `template_idx`."""
        instr = self.op.phrases[template_idx % len(self.op.phrases)]
        opts = "/".join(self.op.options or ())
        return LAYOUTS[template_idx].format(
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
            "templates": self.templates,
        }


def family_tasks(index: int, count: int) -> list[Task]:
    """The first `count` tasks of family `index`, in a fixed order.

    The order puts two operations in one format first (they conflict), then the first
    operation in a second format (close to the first task), then the rest.
    """
    family = FAMILIES[index]
    formats = FORMATS[index % len(FORMATS) :] + FORMATS[: index % len(FORMATS)]
    combos = [(o, f) for f in range(len(formats)) for o in range(len(family.ops))]
    head = [(0, 0), (1, 0), (0, 1), (2, 0)]
    order = head + [c for c in combos if c not in head]
    if count > len(order):
        raise DataError(f"family {family.name} has only {len(order)} tasks; asked for {count}")
    return [Task(family, family.ops[o], formats[f]) for o, f in order[:count]]


def make_tasks(preset: str | Preset) -> list[Task]:
    """All tasks of a preset, family by family. Raises DataError for an unknown preset."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    if p.families > len(FAMILIES):
        raise DataError(f"preset {p.name} wants {p.families} families; there are {len(FAMILIES)}")
    return [t for i in range(p.families) for t in family_tasks(i, p.tasks_per_family)]


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


def task_rows(task: Task, n: int, seed: int) -> list[dict]:
    """`n` distinct examples of `task` as flan-flat rows, split 80/10/10.

    Deterministic in (task, n, seed). Raises DataError when the task's inputs cannot
    give `n` distinct prompts.
    """
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
    n_train, n_val = round(0.8 * n), round(0.1 * n)
    for i, row in enumerate(rows):
        row["split"] = SPLITS[(i >= n_train) + (i >= n_train + n_val)]
    return rows


def generate(tasks: list[Task], examples_per_task: int, seed: int) -> list[dict]:
    """Flan-flat rows for every task (see `task_rows`), task by task."""
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
