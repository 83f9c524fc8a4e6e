"""The benchmark's base model: a small Llama pretrained here on the suite's skills.

Its pretraining data (`data.synthetic.pretraining_examples`) names each operation by an
opaque code and answers task-style prompts with a random operation of the family, so the
base model is a sensible starting point (it knows every skill and the answer formats)
but does not know which answer a task's instruction asks for: that is left to experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorafuse.data.errors import DataError
from lorafuse.fit.schedule import warmup_cosine


@dataclass
class BaseSettings:
    """Size of the base Llama and how long it is pretrained."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    max_length: int = 128
    steps: int = 800
    batch_size: int = 32
    lr: float = 5e-3
    warmup: int = 30
    weight_decay: float = 0.01
    shuffled: float = 0.2

    def __post_init__(self):
        if self.hidden % self.heads:
            raise DataError(f"hidden={self.hidden} must be a multiple of heads={self.heads}")
        if self.steps < 1 or self.batch_size < 1:
            raise DataError(
                f"steps and batch_size must be positive; got {self.steps}, {self.batch_size}"
            )


def build_model(settings: BaseSettings, tokenizer, seed: int):
    """A freshly initialised LlamaForCausalLM sized by `settings` (weights from `seed`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden,
        intermediate_size=settings.intermediate,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.heads,
        max_position_embeddings=settings.max_length,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def pretrain(
    out: str | Path,
    families: int,
    settings: BaseSettings,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Pretrain the base model on the first `families` families and save it to `out`.

    Writes a transformers model and the character tokenizer (`save_pretrained`) into a
    temporary folder renamed to `out`. `on_step(step, loss)` is called after each step.
    Returns {"final_loss": mean loss of the last 10% of steps, "settings": ...}.
    """
    from lorafuse.data.collate import collate, encode
    from lorafuse.data.synthetic import pretraining_examples
    from lorafuse.data.tokenizer import build_char_tokenizer
    from lorafuse.io import atomic_dir

    tokenizer = build_char_tokenizer()
    model = build_model(settings, tokenizer, seed)
    n = settings.steps * settings.batch_size
    encoded = encode(tokenizer, pretraining_examples(families, n, seed, settings.shuffled))
    opt = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.98)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(settings.warmup, settings.steps))
    model.train()
    losses = []
    for step in range(settings.steps):
        chunk = encoded[step * settings.batch_size : (step + 1) * settings.batch_size]
        batch = collate(chunk, tokenizer.pad_token_id, settings.max_length)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    tail = losses[-max(1, len(losses) // 10) :]
    return {"final_loss": sum(tail) / len(tail), "settings": asdict(settings)}
