"""LoRA expert training on any subset of tasks, saved as standard PEFT adapters.

The paper's settings by default (r=4, alpha=16, dropout 0.05, linear warm-up then
cosine); the learning rate is scaled up from the paper's 1e-4 for the small base model.
`train_experts` trains several experts at once (see `stacked`) with the one training loop
(`fit.sgd.train`: the group's rows as its batches hook, the sum of the experts' own losses
as its loss); what it saves is a plain PEFT adapter per expert
(`PeftModel.from_pretrained(base, path)` reloads it) plus `lorafuse_expert.json` with the
tasks it was trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorafuse.data.errors import DataError
from lorafuse.fit.settings import SGDSettings

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ExpertSettings:
    """LoRA and optimisation settings of an expert (`loop()`: the training loop's
    settings; invalid values raise DataError or LorafuseError)."""

    r: int = 4
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 3e-3
    steps: int = 100
    batch_size: int = 16
    warmup: int = 20
    weight_decay: float = 0.0
    max_length: int = 128
    targets: tuple[str, ...] = TARGETS
    # share of each step's examples drawn from a replay corpus (the base model's
    # pretraining data, see `train_experts`): 0 trains on the expert's own tasks only
    replay: float = 0.0

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if self.r < 1:
            raise DataError(f"the LoRA rank r must be a positive integer; got {self.r}")
        if not 0 <= self.dropout < 1:
            raise DataError(f"dropout={self.dropout} must lie in [0, 1)")
        if not 0 <= self.replay < 1:
            raise DataError(f"replay={self.replay} must lie in [0, 1) (a share of each batch)")
        if not self.targets:
            raise DataError("expert settings need at least one target module (e.g. q_proj)")
        self.loop()  # validates the optimisation fields

    def loop(self, steps: int | None = None) -> SGDSettings:
        """The loop's settings of one expert: `steps` (default `self.steps`) steps of
        `batch_size` rows, AdamW, warm-up over `warmup` steps then a cosine down to 0.1 lr."""
        return SGDSettings(
            lr=self.lr, epochs=None, max_steps=steps or self.steps, batch_size=self.batch_size,
            warmup_steps=self.warmup, weight_decay=self.weight_decay, floor=0.1, decay=True,
        )  # fmt: skip


@dataclass
class ExpertJob:
    """One expert to train: its name, its tasks, where it is saved and, when it trains
    longer than the settings say (a cluster expert, one budget per task), its steps."""

    name: str
    tasks: list[str]
    out: Path
    kind: str = "private"
    meta: dict = field(default_factory=dict)
    steps: int | None = None  # None: the settings' steps


def stable_seed(*parts) -> int:
    """A 63-bit seed derived from `parts` (same on every run and machine)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def is_done(out: Path) -> bool:
    """Whether `out` holds a finished expert (written last, by a rename)."""
    from lorafuse.formats.peft import CONFIG_NAME, METADATA_NAME

    return (out / CONFIG_NAME).is_file() and (out / METADATA_NAME).is_file()


class Sampler:
    """Endless shuffled epochs of one expert's `n` examples, from its own generator: each
    epoch a fresh permutation, read from its end; the stream is a pure function of (n,
    seed), so a step's batch does not depend on the calls before it."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise DataError("an expert has no training examples; check its tasks")
        self.n, self.g, self.epochs = n, torch.Generator().manual_seed(seed), []

    def take(self, step: int, b: int) -> list[int]:
        """The example indices of step `step` (0-based) of `b` examples per step."""
        start = step * b
        while len(self.epochs) * self.n < start + b:  # epochs drawn in order, kept
            self.epochs.append(torch.randperm(self.n, generator=self.g).tolist()[::-1])
        return [self.epochs[p // self.n][p % self.n] for p in range(start, start + b)]


def job_examples(jobs: list[ExpertJob], encoded: dict[str, list]) -> list[list]:
    """Each job's encoded training examples (its tasks' examples, concatenated)."""
    out = []
    for job in jobs:
        missing = [t for t in job.tasks if t not in encoded]
        if missing or not job.tasks:
            raise DataError(
                f"expert {job.name}: task(s) {missing or '(none)'} have no training data; "
                f"choose among {', '.join(list(encoded)[:8])}"
            )
        out.append([e for t in job.tasks for e in encoded[t]])
    return out


def token_losses(logits, labels, experts: int):
    """Each expert's mean NLL over its labelled tokens: logits (K*b, T, V) -> (K,)."""
    from lorafuse.data.collate import IGNORE

    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none"
    )  # (K*b, T-1)
    mask = (labels[:, 1:] != IGNORE).float()  # (K*b, T-1)
    per_expert = nll.view(experts, -1).sum(1)  # (K,)
    return per_expert / mask.view(experts, -1).sum(1).clamp(min=1)  # (K,)


def save_expert(peft_model, factors: dict, job: ExpertJob, settings: ExpertSettings, meta: dict):
    """Copy one expert's factors into `peft_model` and save it as a PEFT adapter.

    Writes under a temporary name and renames to `job.out`; adds lorafuse_expert.json.
    """
    import json

    from lorafuse.formats.peft import METADATA_NAME
    from lorafuse.io import atomic_dir

    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, (A, B) in factors.items():
            layer = inner.get_submodule(name)
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
    with atomic_dir(job.out, force=True) as tmp:
        peft_model.save_pretrained(str(tmp))
        info = {
            "tasks": job.tasks,
            "kind": job.kind,
            **job.meta,
            **meta,
            "settings": asdict(settings),
        }
        (tmp / METADATA_NAME).write_text(json.dumps(info, indent=2) + "\n")


def peft_wrapper(base_dir: Path, settings: ExpertSettings):
    """The base model wrapped by PEFT with this expert's LoraConfig (used for saving)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    return peft_model


Progress = Callable[[str, int], None]


def train_experts(
    base_dir: str | Path,
    train: dict[str, list[tuple[str, str]]],
    jobs: list[ExpertJob],
    settings: ExpertSettings,
    seed: int,
    group_size: int = 8,
    on_step: Progress | None = None,
    on_saved: Callable[[ExpertJob, dict], None] | None = None,
    resume: bool = True,
    device: str = "cpu",
    replay: list[tuple[str, str]] | None = None,
) -> dict[str, dict]:
    """Train `jobs` in groups of `group_size` experts sharing one batched model.

    `train` is {task: [(source, target), ...]} (the train split). Groups are consecutive
    jobs with the same number of steps. With `settings.replay` > 0, that share of each
    expert's batch is drawn from `replay` ((source, target) pairs, e.g. the base model's
    pretraining data), each expert from its own generator. With `resume`, a group
    whose experts are all saved already is skipped, and a partly saved group is retrained
    whole (so a resumed run gives the same experts as an uninterrupted one) but only its
    missing experts are written; without it every expert is trained and its folder
    replaced. Every expert starts from the same LoRA init (from `seed`) and draws its
    batches from its own generator. `on_step(name, step)` reports progress after each step
    (name of the group's first expert, steps taken); `on_saved(job, metrics)` runs after
    each expert is written.
    Returns {expert name: metrics} for experts trained.
    """
    from transformers import AutoTokenizer

    from lorafuse.data.collate import encode
    from lorafuse.devices import device as resolve_device

    device = resolve_device(str(device), "device")
    base_dir = Path(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    needed = sorted({t for job in jobs for t in job.tasks})
    missing = [t for t in needed if t not in train]
    if missing:
        raise DataError(f"task(s) {', '.join(missing)} have no training data in the data given")
    encoded = {t: encode(tokenizer, train[t]) for t in needed}
    if settings.replay > 0 and not replay:
        raise DataError(f"replay={settings.replay} needs a replay corpus; none was given")
    replayed = encode(tokenizer, replay) if settings.replay > 0 else None
    results: dict[str, dict] = {}
    saver = None
    for group in job_groups(jobs, group_size, settings.steps):
        if resume and all(is_done(j.out) for j in group):
            continue
        factors, metrics = _train_group(
            base_dir, tokenizer, group, encoded, settings, seed, on_step, device, replayed
        )
        saver = saver or peft_wrapper(base_dir, settings)
        for k, job in enumerate(group):
            if resume and is_done(job.out):
                continue
            save_expert(saver, factors[k], job, settings, metrics[k])
            results[job.name] = metrics[k]
            if on_saved is not None:
                on_saved(job, metrics[k])
    return results


def job_groups(jobs: list[ExpertJob], group_size: int, steps: int) -> list[list[ExpertJob]]:
    """Consecutive jobs in groups of at most `group_size` with equal steps (a job's own
    `steps`, else `steps`)."""
    groups: list[list[ExpertJob]] = []
    for job in jobs:
        last = groups[-1] if groups else None
        same = last is not None and (last[0].steps or steps) == (job.steps or steps)
        if same and len(last) < group_size:
            last.append(job)
        else:
            groups.append([job])
    return groups


def _train_group(base_dir, tokenizer, group, encoded, settings, seed, on_step, device, replayed):
    from transformers import AutoModelForCausalLM

    from lorafuse.benchmark.stacked import attach_stacked, expert_factors, lora_init
    from lorafuse.data.collate import collate
    from lorafuse.fit.sgd import train

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    K, b, steps = len(group), settings.batch_size, group[0].steps or settings.steps
    n_replay = round(settings.replay * b) if replayed else 0  # replayed rows per expert
    b_own = b - n_replay
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    init = lora_init(model, list(settings.targets), settings.r, seed)
    if not init:
        raise DataError(f"the base model has no Linear module named {settings.targets}")
    layers = attach_stacked(model, init, K, settings.alpha / settings.r, settings.dropout)
    model.to(device)
    params = {f"{n}.{w}": getattr(layer, w) for n, layer in layers.items() for w in "AB"}
    examples = job_examples(group, encoded)
    samplers = [
        Sampler(len(ex), stable_seed(seed, "data", job.name)) for ex, job in zip(examples, group)
    ]
    replays = [
        Sampler(len(replayed), stable_seed(seed, "replay", job.name)) if n_replay else None
        for job in group
    ]

    def rows(step: int) -> list:  # the step's K*b rows, expert-major: each expert's b in order
        out = []
        for ex, s, r in zip(examples, samplers, replays):
            out += [ex[i] for i in s.take(step, b_own)]
            out += [replayed[i] for i in r.take(step, n_replay)] if r is not None else []
        return out

    history = []  # (K,) per step

    def loss_fn(batch_rows: list):  # the sum of the K experts' own mean token losses
        batch = collate(batch_rows, pad_id, settings.max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        next(iter(layers.values())).dropout.clear()  # the next forward draws new masks
        losses = token_losses(logits, batch["labels"], K)  # (K,)
        history.append(losses.detach().cpu())
        return losses.sum()

    def progress(step: int, _loss: float) -> None:
        if on_step is not None:
            on_step(group[0].name, step)

    torch.manual_seed(stable_seed(seed, "dropout", *[job.name for job in group]))
    model.train()
    train(params, loss_fn, steps * b, settings.loop(steps), progress=progress, batches=rows)
    tail = torch.stack(history)[-max(1, steps // 10) :].mean(0)  # (K,)
    metrics = [{"train_loss": round(float(tail[k]), 5), "steps": steps} for k in range(K)]
    factors = [
        {n: (A.cpu(), B.cpu()) for n, (A, B) in expert_factors(layers, k).items()} for k in range(K)
    ]
    return factors, metrics


def train_expert(
    base_dir: str | Path,
    train: dict[str, list[tuple[str, str]]],
    tasks: list[str],
    out: str | Path,
    settings: ExpertSettings,
    seed: int,
    name: str | None = None,
    on_step: Progress | None = None,
    device: str = "cpu",
) -> dict:
    """Train one expert on `tasks` and save it at `out`, replacing it (see `train_experts`)."""
    job = ExpertJob(name or Path(out).name, list(tasks), Path(out), kind="custom")
    results = train_experts(base_dir, train, [job], settings, seed, 1, on_step, None, False, device)
    return results[job.name]
