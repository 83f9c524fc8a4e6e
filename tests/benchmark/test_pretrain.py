"""Pretraining through the one loop equals a plain torch loop (AdamW, LambdaLR warm-up and
cosine to 0.1, the gradient clipped at norm 1) written out; its settings are the loop's."""

from __future__ import annotations

import pytest
import torch

from lorafuse.benchmark.pretrain import BaseSettings, build_model, pretrain
from lorafuse.data.errors import DataError
from lorafuse.errors import LorafuseError

SETTINGS = dict(hidden=32, layers=2, heads=2, intermediate=48, max_length=64, steps=6,
                batch_size=4, lr=5e-3, warmup=2)  # fmt: skip


def _plain(settings: BaseSettings, families: int, seed: int):
    """The reference: the same model and stream, trained by a hand-written torch loop."""
    from lorafuse.data.collate import collate, encode
    from lorafuse.data.synthetic import pretraining_examples
    from lorafuse.data.tokenizer import build_char_tokenizer
    from lorafuse.fit.schedule import warmup_cosine

    tok = build_char_tokenizer()
    model = build_model(settings, tok, seed)
    b = settings.batch_size
    stream = pretraining_examples(families, settings.steps * b, seed, settings.shuffled)
    encoded = encode(tok, stream)
    opt = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.98)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(settings.warmup, settings.steps))
    model.train()
    losses = []
    for step in range(settings.steps):
        batch = collate(encoded[step * b : (step + 1) * b], tok.pad_token_id, settings.max_length)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, losses


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order in both runs
    yield
    torch.set_num_threads(before)


def test_pretraining_equals_a_plain_torch_loop(tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    settings = BaseSettings(**SETTINGS)
    steps = []
    info = pretrain(tmp_path / "base", 2, settings, seed=3, on_step=lambda i, _: steps.append(i))
    ref, losses = _plain(settings, 2, seed=3)
    assert steps == list(range(1, settings.steps + 1))
    tail = losses[-max(1, len(losses) // 10) :]
    assert info["final_loss"] == sum(tail) / len(tail)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    for name, p in ref.state_dict().items():
        assert torch.equal(saved[name], p), name


def test_settings_build_the_loops_and_are_checked():
    s = BaseSettings(**SETTINGS).loop()
    assert (s.lr, s.max_steps, s.batch_size, s.warmup_steps, s.epochs) == (5e-3, 6, 4, 2, None)
    assert (s.floor, s.decays(), s.max_grad_norm, s.betas) == (0.1, True, 1.0, (0.9, 0.98))
    with pytest.raises(DataError, match="multiple of heads"):
        BaseSettings(hidden=30, heads=4)
    for bad in ({"steps": 0}, {"batch_size": 0}, {"lr": 0.0}, {"warmup": -1}):
        with pytest.raises(LorafuseError, match="invalid training settings"):
            BaseSettings(**bad)
