"""Expert training: K experts batched == each trained alone with plain PEFT; the saved
adapters are standard PEFT adapters; bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch

from lorafuse.benchmark.train import (
    ExpertJob,
    ExpertSettings,
    Sampler,
    job_groups,
    stable_seed,
    train_experts,
)
from lorafuse.data.errors import DataError
from lorafuse.data.synthetic import generate, make_tasks
from lorafuse.errors import LorafuseError

SEED = 7


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models are overhead-bound: one thread is faster, and immune to a busy CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    """A pico Llama with the char tokenizer, and the micro suite's training data."""
    from lorafuse.benchmark.pretrain import BaseSettings, build_model
    from lorafuse.data.tokenizer import build_char_tokenizer

    root = tmp_path_factory.mktemp("train")
    tok = build_char_tokenizer()
    settings = BaseSettings(hidden=32, layers=2, heads=2, intermediate=48)
    build_model(settings, tok, seed=0).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    train = {}
    for r in generate(make_tasks("micro"), 20, seed=0):
        if r["split"] == "train":
            train.setdefault(r["task_name"], []).append((r["source"], r["target"]))
    return root, train


def _settings(**kw):
    return ExpertSettings(
        **{
            "steps": 3,
            "batch_size": 4,
            "lr": 1e-2,
            "warmup": 1,
            "dropout": 0.0,
            "max_length": 96,
            **kw,
        }
    )


def _peft_alone(base_dir, train, job, settings, replay=None):
    """The reference: one expert, plain PEFT model, the transformers loss, same batches
    (`settings.replay` of each batch from `replay`, for `job.steps` when it has them)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafuse.benchmark.stacked import lora_init
    from lorafuse.data.collate import collate, encode
    from lorafuse.fit.schedule import warmup_cosine

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    init = lora_init(base, list(settings.targets), settings.r, SEED)
    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=0.0,
        target_modules=list(settings.targets),
    )
    model = get_peft_model(base, cfg)
    inner = model.base_model.model
    with torch.no_grad():
        for name, A in init.items():
            inner.get_submodule(name).lora_A["default"].weight.copy_(A)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps = job.steps or settings.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(settings.warmup, steps))
    examples = [e for t in job.tasks for e in encode(tok, train[t])]
    sampler = Sampler(len(examples), stable_seed(SEED, "data", job.name))
    n_replay = round(settings.replay * settings.batch_size)
    replayed = encode(tok, replay) if n_replay else []
    replays = Sampler(len(replayed), stable_seed(SEED, "replay", job.name)) if n_replay else None
    model.train()
    for step in range(steps):
        rows = [examples[i] for i in sampler.take(step, settings.batch_size - n_replay)]
        rows += [replayed[i] for i in replays.take(step, n_replay)] if n_replay else []
        batch = collate(rows, tok.pad_token_id, settings.max_length)
        model(**batch).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    out = {}
    for n in init:
        layer = inner.get_submodule(n)
        out[n] = (layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach())
    return out


def _saved(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_batched_experts_equal_plain_peft_training_alone(pico, tmp_path):
    root, train = pico
    tasks = list(train)
    jobs = [ExpertJob(f"e{i}", [t], tmp_path / f"e{i}") for i, t in enumerate(tasks[:2])]
    jobs.append(ExpertJob("both", tasks[:2], tmp_path / "both", kind="shared"))
    settings = _settings()
    train_experts(root / "base", train, jobs, settings, SEED, group_size=3)
    for job in jobs:
        ref = _peft_alone(root / "base", train, job, settings)
        saved = _saved(job.out)
        for name, (A, B) in ref.items():
            key = f"base_model.model.{name}"
            torch.testing.assert_close(saved[f"{key}.lora_A.weight"], A, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(saved[f"{key}.lora_B.weight"], B, atol=2e-5, rtol=1e-4)
        assert B.abs().max() > 1e-4  # the expert did move


def test_replay_and_own_steps_equal_plain_peft_training_alone(pico, tmp_path):
    # Half of each batch replays a corpus; a job with its own steps trains in its own group.
    root, train = pico
    tasks = list(train)
    replay = [(s, t) for t in tasks[2:] for s, t in train[t]]  # any (source, target) pairs
    jobs = [ExpertJob(f"e{i}", [t], tmp_path / f"e{i}") for i, t in enumerate(tasks[:2])]
    jobs.append(ExpertJob("long", tasks[:2], tmp_path / "long", kind="mbc", steps=5))
    settings = _settings(replay=0.5)
    assert [[j.name for j in g] for g in job_groups(jobs, 8, settings.steps)] == [
        ["e0", "e1"], ["long"]
    ]  # fmt: skip
    done = train_experts(root / "base", train, jobs, settings, SEED, 8, replay=replay)
    assert [done[j.name]["steps"] for j in jobs] == [3, 3, 5]
    for job in jobs:
        ref = _peft_alone(root / "base", train, job, settings, replay)
        saved = _saved(job.out)
        for name, (A, B) in ref.items():
            key = f"base_model.model.{name}"
            torch.testing.assert_close(saved[f"{key}.lora_A.weight"], A, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(saved[f"{key}.lora_B.weight"], B, atol=2e-5, rtol=1e-4)
    with pytest.raises(DataError, match="replay corpus"):
        train_experts(root / "base", train, jobs[:1], settings, SEED, resume=False)
    with pytest.raises(DataError, match="replay"):
        ExpertSettings(replay=1.0)


def test_saved_expert_reloads_with_plain_peft(pico, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, train = pico
    task = next(iter(train))
    job = ExpertJob("one", [task], tmp_path / "one")
    train_experts(root / "base", train, [job], _settings(dropout=0.05), SEED)
    cfg = json.loads((job.out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 16.0, 0.05)
    assert cfg["base_model_name_or_path"] == str(root / "base")
    assert json.loads((job.out / "lorafuse_expert.json").read_text())["tasks"] == [task]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), job.out)
    merged = AutoModelForCausalLM.from_pretrained(root / "base")
    saved = _saved(job.out)
    with torch.no_grad():  # W + (alpha / r) B A, by hand
        for key in saved:
            if key.endswith("lora_A.weight"):
                name = key[len("base_model.model.") : -len(".lora_A.weight")]
                B = saved[key.replace("lora_A", "lora_B")]
                merged.get_submodule(name).weight += 4.0 * B @ saved[key]
    x = torch.randint(4, 90, (2, 12))
    torch.testing.assert_close(peft.eval()(x).logits, merged.eval()(x).logits, atol=1e-5, rtol=1e-4)


def test_sampler_is_a_pure_function_of_the_step():
    # The stream written out: each epoch a fresh permutation from one generator, read from
    # its end; any step asked first gives the same indices.
    g = torch.Generator().manual_seed(11)
    stream = [i for _ in range(4) for i in reversed(torch.randperm(5, generator=g).tolist())]
    assert [Sampler(5, 11).take(s, 3) for s in range(6)] == [
        stream[3 * s : 3 * s + 3] for s in range(6)
    ]
    late = Sampler(5, 11)
    assert late.take(4, 3) == stream[12:15] and late.take(0, 3) == stream[:3]


def test_settings_build_the_loops():
    s = _settings(weight_decay=0.01).loop(7)
    assert (s.lr, s.max_steps, s.batch_size, s.warmup_steps, s.weight_decay) == (
        1e-2, 7, 4, 1, 0.01
    )  # fmt: skip
    assert (s.epochs, s.floor, s.decays(), s.max_grad_norm, s.grad_accum) == (
        None, 0.1, True, None, 1
    )  # fmt: skip
    assert _settings().loop().max_steps == 3  # the settings' own steps


def test_bad_tasks_and_settings(pico, tmp_path):
    root, train = pico
    with pytest.raises(DataError, match="nope"):
        train_experts(
            root / "base", train, [ExpertJob("x", ["nope"], tmp_path / "x")], _settings(), SEED
        )
    with pytest.raises(DataError, match="positive"):
        ExpertSettings(r=0)
    for bad in ({"steps": 0}, {"batch_size": 0}, {"lr": -1.0}, {"warmup": -1}):
        with pytest.raises(LorafuseError, match="invalid training settings"):
            ExpertSettings(**bad)
    with pytest.raises(DataError, match="Linear module"):
        task = next(iter(train))
        train_experts(
            root / "base",
            train,
            [ExpertJob("x", [task], tmp_path / "x")],
            _settings(targets=("c_attn",)),
            SEED,
        )
    assert not (tmp_path / "x").exists()
