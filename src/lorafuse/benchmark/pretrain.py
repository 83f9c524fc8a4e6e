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
from lorafuse.fit.settings import SGDSettings


@dataclass
class BaseSettings:
    """Size of the base Llama and how long it is pretrained (`loop()`: the training
    loop's settings; invalid values raise DataError or LorafuseError)."""

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
        self.loop()  # validates the optimisation fields

    def loop(self) -> SGDSettings:
        """The loop's settings: `steps` steps of `batch_size` examples read in order,
        AdamW (betas 0.9, 0.98), warm-up over `warmup` steps then a cosine down to 0.1 lr,
        the gradient's norm clipped at 1."""
        return SGDSettings(
            lr=self.lr, epochs=None, max_steps=self.steps, batch_size=self.batch_size,
            warmup_steps=self.warmup, weight_decay=self.weight_decay, floor=0.1, decay=True,
            max_grad_norm=1.0, betas=(0.9, 0.98),
        )  # fmt: skip


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
    temporary folder renamed to `out`. Trains with the one loop (`fit.sgd.train`, settings
    `settings.loop()`); `on_step(step, loss)` is called after each step (`step` steps
    taken). Returns {"final_loss": mean loss of the last 10% of steps, "settings": ...}.
    """
    from lorafuse.data.collate import collate, encode
    from lorafuse.data.synthetic import pretraining_examples
    from lorafuse.data.tokenizer import build_char_tokenizer
    from lorafuse.fit.sgd import train
    from lorafuse.io import atomic_dir

    tokenizer = build_char_tokenizer()
    model = build_model(settings, tokenizer, seed)
    b = settings.batch_size
    n = settings.steps * b
    encoded = encode(tokenizer, pretraining_examples(families, n, seed, settings.shuffled))

    def loss_fn(idx) -> torch.Tensor:  # the mean token loss of these examples
        return model(
            **collate([encoded[i] for i in idx], tokenizer.pad_token_id, settings.max_length)
        ).loss

    losses: list[float] = []

    def step_done(step: int, loss: float) -> None:
        losses.append(loss)
        if on_step is not None:
            on_step(step, loss)

    model.train()
    train(
        dict(model.named_parameters()), loss_fn, n, settings.loop(), progress=step_done,
        batches=lambda step: range(step * b, (step + 1) * b),  # the stream, in order
    )  # fmt: skip
    model.eval()
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    tail = losses[-max(1, len(losses) // 10) :]
    return {"final_loss": sum(tail) / len(tail), "settings": asdict(settings)}
