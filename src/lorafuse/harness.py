"""An lm-evaluation-harness backend: any lorafuse method as the lm-eval model "lorafuse".

    pip install 'lorafuse[lm-eval]'
    python -m lorafuse.harness run --model lorafuse \
        --model_args library=runs/small,method=route-sgd,experts=mbc --tasks my_task

`python -m lorafuse.harness` is lm-eval's own command line with the model registered;
in Python, `register()` then `lm_eval.simple_evaluate(model="lorafuse", ...)`, or pass
`LorafuseLM(...)` itself. The model arguments: `library` (a benchmark folder or library
spec; fitted methods read their fits from its fits folder), `method`, `experts` (the
kind), `task` (the oracle's task for every request; default: each request's lm-eval task
name), `device`, `dtype`, `batch_size`, `max_new_tokens`.

- loglikelihood(context, continuation): the continuation's summed log-probability under
  the method's forward (fused, merged or routed; an ensemble mixes its experts'
  probabilities or logits), and whether it is the greedy continuation. An empty context
  is the end-of-sequence token, as lm-eval's own models do.
- loglikelihood_rolling(text): lm-eval's disjoint rolling windows of max_length tokens.
- generate_until(context, kwargs): lorafuse's greedy decoding (KV cache; an ensemble runs
  all its experts in one forward per token) for at most `max_gen_toks` tokens, stopped
  at the end-of-sequence token and cut at the first `until` string. Only greedy decoding:
  `do_sample: true` is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from lorafuse.errors import LorafuseError

try:
    from lm_eval.api.model import LM
except ImportError:  # pragma: no cover - the optional extra is missing
    raise LorafuseError(
        "the lm-evaluation-harness backend needs lm-eval: pip install 'lorafuse[lm-eval]'"
    ) from None

NAME = "lorafuse"


class LorafuseLM(LM):
    """A lorafuse method, prepared once, answering lm-eval's three kinds of request."""

    def __init__(
        self,
        library: str,
        method: str,
        experts: str = "private",
        task: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str | None = None,
        max_new_tokens: int | str = 256,
        **_ignored: Any,  # lm-eval passes max_batch_size and the like to every model
    ):
        super().__init__()
        from lorafuse.methods.run import method_context
        from lorafuse.spec import load_spec
        from lorafuse.workspace import Workspace

        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes cuda:0 by default; its own models fall back too
            logging.getLogger(__name__).warning(
                "device %s: torch sees no CUDA GPU; using the setup's device", device
            )
            device = None
        self.ws = Workspace(load_spec(library), device=device, dtype=dtype)
        self.task = task
        self.max_new_tokens = _positive(max_new_tokens, "max_new_tokens")
        auto = batch_size in (None, "auto") or str(batch_size).startswith("auto")
        self.batch_size = self.ws.spec.batch_size if auto else _positive(batch_size, "batch_size")
        m, ctx = method_context(self.ws, method, experts)
        self.prepared = m.prepare(ctx)  # the model stays fused until close()
        self._device = self.ws.device

    def close(self) -> None:
        """Detach the experts: the workspace's model is the base model again."""
        self.prepared.close()

    # ---- lm-eval's requests ------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(summed log-probability, is greedy) of each request's continuation."""
        pairs = [(self._context(c), self._encode(x)) for c, x in (r.args[:2] for r in requests)]
        return self._score(pairs, [self._task(r) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Summed log-probability of each request's whole text, in rolling windows."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner, tasks = [], [], []
        for i, r in enumerate(requests):
            tokens = self._encode(r.args[0])
            windows = get_rolling_token_windows(
                tokens, self._eos, self.ws.spec.max_length, context_len=1
            )
            for w in map(make_disjoint_window, windows):
                pairs.append(w)
                owner.append(i)
                tasks.append(self._task(r))
        out = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._score(pairs, tasks)):
            out[i] += ll
        return out

    def generate_until(self, requests) -> list[str]:
        """Each request's greedy continuation, cut at its first `until` string."""
        from lorafuse.generate import generate_ids
        from lorafuse.methods.run import decoding

        prompts, caps, stops, tasks = [], [], [], []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] or {})
            if kwargs.get("do_sample"):
                raise LorafuseError(
                    "the lorafuse backend decodes greedily; set do_sample: false in the task"
                )
            cap = _positive(kwargs.get("max_gen_toks", self.max_new_tokens), "max_gen_toks")
            until = kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            keep = max(1, self.ws.spec.max_length - cap)
            prompts.append(self._context(context)[-keep:])
            caps.append(cap)
            tasks.append(self._task(r))
        decoder, size = decoding(self.ws, self.prepared, tasks, self.batch_size)
        rows = generate_ids(
            decoder, prompts, caps, self._eos, self.ws.pad_id, tasks, size, self.ws.device
        )
        texts = [self.ws.tokenizer.decode(row, skip_special_tokens=True) for row in rows]
        return [_cut(text, stop) for text, stop in zip(texts, stops)]

    # ---- helpers ------------------------------------------------------------------------
    @property
    def _eos(self) -> int:
        return int(self.ws.tokenizer.eos_token_id)

    def _encode(self, text: str) -> list[int]:
        return list(self.ws.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _context(self, text: str) -> list[int]:
        return self._encode(text) or [self._eos]

    def _task(self, request) -> str:
        return self.task or getattr(request, "task_name", None) or ""

    @torch.inference_mode()
    def _score(self, pairs: Sequence[tuple[list[int], list[int]]], tasks: Sequence[str]):
        """(summed log-probability, greedy) of each (context ids, continuation ids)."""
        from lorafuse.data.collate import collate
        from lorafuse.evaluate import target_logprobs
        from lorafuse.workspace import EvalBatch

        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            tensors = collate([pairs[i] for i in idx], self.ws.pad_id, self.ws.spec.max_length)
            logits = self.prepared.forward(EvalBatch(tensors, [tasks[i] for i in idx]))
            labels = tensors["labels"].to(logits.device)  # (B, T)
            logp, mask = target_logprobs(logits, labels)  # (B, T-1) each
            hits = (logits[:, :-1].argmax(-1) == labels[:, 1:]) | ~mask  # (B, T-1)
            for i, ll, greedy in zip(idx, logp.sum(1).tolist(), hits.all(1).tolist()):
                out[i] = (float(ll), bool(greedy))
        return out


def _positive(value: Any, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise LorafuseError(f"{name} must be a whole number >= 1; got {value!r}") from None
    if n < 1:
        raise LorafuseError(f"{name} must be a whole number >= 1; got {value!r}")
    return n


def _cut(text: str, stops: Sequence[str]) -> str:
    ends = [text.find(s) for s in stops if s and s in text]
    return text[: min(ends)] if ends else text


def register() -> type[LorafuseLM]:
    """Register LorafuseLM with lm-eval as "lorafuse" (once); return the class."""
    from lm_eval.api.registry import get_model, register_model

    try:
        if get_model(NAME) is LorafuseLM:
            return LorafuseLM
    except ValueError:
        pass
    register_model(NAME)(LorafuseLM)
    return LorafuseLM


def main() -> None:
    """lm-eval's command line with the "lorafuse" model registered."""
    from lm_eval.__main__ import cli_evaluate

    register()
    cli_evaluate()


if __name__ == "__main__":
    main()
