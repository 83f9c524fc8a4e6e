"""Workspace: the loaded pieces of a setup (model, tokenizer, libraries, data), on demand."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from torch import Tensor

from lorafuse.devices import device as resolve_device
from lorafuse.dtypes import dtype as parse_dtype
from lorafuse.errors import LibraryMismatchError, LorafuseError
from lorafuse.library import ExpertLibrary
from lorafuse.spec import LibrarySpec


@dataclass
class EvalBatch:
    """A collated batch plus the task of each row."""

    tensors: dict[str, Tensor]  # input_ids, attention_mask, labels: (B, T)
    tasks: list[str]  # (B,)


class Workspace:
    """Loads a LibrarySpec's base model, tokenizer, expert libraries and data lazily."""

    def __init__(self, spec: LibrarySpec, device: str | None = None, dtype: str | None = None):
        self.spec = spec
        self.device = resolve_device(device or spec.device, "device")
        self.dtype = parse_dtype(dtype or spec.dtype)
        self._libraries: dict[str, ExpertLibrary] = {}

    # ---- model and tokenizer -----------------------------------------------------------
    @cached_property
    def tokenizer(self):
        """The tokenizer (from `tokenizer`, else the base model's folder or id)."""
        from transformers import AutoTokenizer

        source = self.spec.path(self.spec.tokenizer or self.base_id)
        with _loading("tokenizer", source):
            tok = AutoTokenizer.from_pretrained(source)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok

    @property
    def base_id(self) -> str:
        """The base model's path or hub id."""
        return self.spec.path(self.spec.base_model)

    @cached_property
    def model(self):
        """The base causal LM, frozen, in eval mode, on the workspace's device and dtype."""
        from transformers import AutoModelForCausalLM

        with _loading("base model", self.base_id):
            model = AutoModelForCausalLM.from_pretrained(self.base_id, dtype=self.dtype)
        model.to(self.device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def logits(self, tensors: dict[str, Tensor]) -> Tensor:
        """The model's logits (B, T, V) for a collated batch (moved to the device)."""
        return self.model(
            input_ids=tensors["input_ids"].to(self.device),
            attention_mask=tensors["attention_mask"].to(self.device),
        ).logits

    # ---- experts -----------------------------------------------------------------------
    @property
    def kinds(self) -> list[str]:
        """The expert kinds the spec names (e.g. private, mbc, shared)."""
        return list(self.spec.experts)

    def library(self, kind: str) -> ExpertLibrary:
        """The experts of one kind, loaded once; raises LorafuseError for an unknown kind."""
        if kind not in self.spec.experts:
            raise LorafuseError(
                f"no experts of kind {kind!r}; this setup has {', '.join(self.kinds) or 'none'}"
            )
        if kind not in self._libraries:
            try:
                lib = ExpertLibrary.load(self.spec.expert_paths(kind), base_model=self.base_id)
            except LibraryMismatchError as e:
                raise LibraryMismatchError(f"{e} (setup base model: {self.base_id})") from None
            self._libraries[kind] = lib
        return self._libraries[kind]

    def task_map(self, kind: str, tasks: list[str] | None = None) -> dict[str, str]:
        """task -> expert name for one kind: the spec's map, else the experts' own tasks.

        Raises LorafuseError when the map names unknown experts or tasks, when two experts
        claim one task, or (given `tasks`) when a task has no expert.
        """
        lib = self.library(kind)
        known_tasks = set(self.tasks)
        if kind in self.spec.task_map:
            mapping = dict(self.spec.task_map[kind])
            bad_experts = sorted({e for e in mapping.values() if e not in lib.names})
            if bad_experts:
                raise LorafuseError(
                    f"task_map.{kind} names unknown expert(s) {bad_experts[:5]}; "
                    f"the {kind} experts are {lib.names[:8]}"
                )
        else:
            mapping = {}
            for e in lib.experts:
                for t in e.tasks:
                    if t in mapping and t in known_tasks:
                        raise LorafuseError(
                            f"task {t} is claimed by experts {mapping[t]} and {e.name} of kind "
                            f"{kind}; give task_map.{kind} in the spec to choose"
                        )
                    mapping[t] = e.name
        bad_tasks = sorted(t for t in mapping if t not in known_tasks)
        if kind in self.spec.task_map and bad_tasks:
            raise LorafuseError(
                f"task_map.{kind} names task(s) {bad_tasks[:5]} that are not in the data"
            )
        mapping = {t: e for t, e in mapping.items() if t in known_tasks}
        missing = [t for t in (tasks or []) if t not in mapping]
        if missing:
            raise LorafuseError(
                f"no {kind} expert is mapped to task(s) {missing[:5]}; record the tasks in the "
                f"experts' lorafuse_expert.json or give task_map.{kind}"
            )
        return mapping

    # ---- data --------------------------------------------------------------------------
    @cached_property
    def dataset(self):
        """The flan-flat data (all splits), filtered to the spec's tasks."""
        from lorafuse.data.flan import load_flan

        return load_flan(self.spec.path(self.spec.data), tasks=self.spec.tasks)

    @cached_property
    def tasks(self) -> list[str]:
        """Task names in order of first appearance in the data."""
        from lorafuse.data.flan import task_names

        return task_names(self.dataset)

    def examples(self, split: str, max_per_task: int | None = None) -> list[tuple[str, str, str]]:
        """(source, target, task) of one split, at most `max_per_task` per task."""
        from lorafuse.data.flan import examples

        rows = []
        for task, pairs in examples(self.dataset, split, self.tasks).items():
            rows.extend((s, t, task) for s, t in pairs[:max_per_task])
        if not rows:
            raise LorafuseError(f"split {split!r} has no examples")
        return rows

    def batches(
        self, split: str, max_per_task: int | None = None, batch_size: int | None = None
    ) -> list[EvalBatch]:
        """Collated batches of one split, sorted by length to keep padding small."""
        from lorafuse.data.collate import collate, encode

        rows = self.examples(split, max_per_task)
        encoded = encode(self.tokenizer, [(s, t) for s, t, _ in rows])
        order = sorted(range(len(rows)), key=lambda i: sum(map(len, encoded[i])))
        size = batch_size or self.spec.batch_size
        out = []
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            tensors = collate([encoded[i] for i in idx], self.pad_id, self.spec.max_length)
            out.append(EvalBatch(tensors, [rows[i][2] for i in idx]))
        return out

    @property
    def fits_dir(self) -> str:
        """Folder of fitted coefficients (the spec's `fits`, relative to its folder)."""
        return str(Path(self.spec.root) / self.spec.fits)

    @property
    def pad_id(self) -> int:
        """The padding token id."""
        return int(self.tokenizer.pad_token_id)


@contextlib.contextmanager
def _loading(what: str, source: str):
    # transformers raises OSError/ValueError with hub wording for a bad local path.
    try:
        yield
    except (OSError, ValueError) as e:
        raise LorafuseError(
            f"cannot load the {what} from {source!r}: {str(e).splitlines()[0]}; check the path "
            "(a local folder saved with save_pretrained) or the hub id"
        ) from None
