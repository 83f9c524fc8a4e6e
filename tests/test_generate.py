"""Greedy decoding with a KV cache against step-by-step references without one.

Ensembles are checked against a reference that runs each expert separately (PEFT's own
model of each adapter, the whole sequence again at every step, no cache), mixes their
next-token distributions by hand and takes the argmax.
"""

from __future__ import annotations

import pytest
import torch

from lorafuse.errors import LorafuseError
from lorafuse.generate import EnsembleDecoder, ModelDecoder, generate_ids, greedy, left_pad
from lorafuse.library import ExpertLibrary
from lorafuse.model import attached
from tests.conftest import load_base

PROMPTS = [[5, 9, 3, 17, 2, 8], [11, 4], [7, 7, 30, 1]]  # of different lengths: left padding
STEPS = 6
EOS = 63


def _reference(next_logp, prompts, steps: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of each prompt alone, the whole sequence recomputed at every step;
    `next_logp(ids (1, T)) -> (V,)`. Also the log-probabilities of every step, (steps, V)."""
    tokens, logps = [], []
    for p in prompts:
        seq, lps = list(p), []
        for _ in range(steps):
            lp = next_logp(torch.tensor([seq]))  # (V,)
            lps.append(lp)
            seq.append(int(lp.argmax()))
        tokens.append(seq[len(p) :])
        logps.append(torch.stack(lps))
    return tokens, logps


def _peft_logps(base_dir, expert_dirs):
    """Each expert's next-token log-probabilities by PEFT's own model (no lorafuse)."""
    from peft import PeftModel

    models = [PeftModel.from_pretrained(load_base(base_dir), str(d)).eval() for d in expert_dirs]

    def per_expert(ids):  # (1, T) -> (n, V)
        with torch.no_grad():
            return torch.stack([torch.log_softmax(m(ids).logits[0, -1], -1) for m in models])

    return per_expert


def _run(decoder, prompts, steps: int, eos: int = -1):
    ids, mask = left_pad(prompts, pad_id=0)
    caps = torch.full((len(prompts),), steps)
    return greedy(decoder, ids, mask, caps, eos)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_model_decoder_equals_recomputing_every_step(arch, llama_dir, gpt2_dir):
    model = load_base(llama_dir if arch == "llama" else gpt2_dir)

    def next_logp(ids):
        with torch.no_grad():
            return torch.log_softmax(model(ids).logits[0, -1], -1)

    expected, _ = _reference(next_logp, PROMPTS, STEPS)
    assert _run(ModelDecoder(model), PROMPTS, STEPS) == expected


@pytest.mark.parametrize("level", ["probs", "logits"])
def test_ensemble_decoding_mixes_the_experts_distributions(level, llama_dir, llama_experts):
    w = torch.tensor([0.1, 0.0, 0.6, 0.3])  # sparse: the zero-weight expert must not run
    nonzero = [0, 2, 3]
    per_expert = _peft_logps(llama_dir, [llama_experts[i] for i in nonzero])
    wn = w[nonzero]

    def next_logp(ids):  # the mixture, computed by hand from separate expert passes
        lp = per_expert(ids)  # (n, V)
        if level == "probs":
            return torch.log((wn[:, None] * lp.exp()).sum(0))
        logits = lp  # log-softmax differs from the logits by a per-expert constant only
        return torch.log_softmax((wn[:, None] * logits).sum(0), -1)

    expected, expected_logp = _reference(next_logp, PROMPTS, STEPS)
    model = load_base(llama_dir)
    rows = []
    calls = []
    model.register_forward_hook(lambda m, a, kw, out: rows.append(kw["input_ids"].shape[0]),
                                with_kwargs=True)  # fmt: skip
    with attached(model, ExpertLibrary.load(llama_experts)) as fusion:
        decoder = EnsembleDecoder(model, fusion, w, level)
        got = _run(_Recording(decoder, calls), PROMPTS, STEPS)
    assert got == expected
    # One forward per step, every nonzero expert in it: 3 prompts x 3 experts rows.
    assert rows == [len(PROMPTS) * len(nonzero)] * STEPS
    for b in range(len(PROMPTS)):  # the mixed distributions themselves, step by step
        mine = torch.stack([c[b] for c in calls])  # (steps, V)
        torch.testing.assert_close(mine, expected_logp[b], atol=1e-4, rtol=1e-4)


class _Recording:
    """A decoder that keeps every step's log-probabilities."""

    def __init__(self, inner, calls):
        self.inner, self.calls = inner, calls

    def start(self, ids, mask):
        self.calls.append(out := self.inner.start(ids, mask))
        return out

    def step(self, tokens):
        self.calls.append(out := self.inner.step(tokens))
        return out


def test_one_expert_ensemble_equals_that_expert_fused(llama_dir, llama_experts):
    model = load_base(llama_dir)
    with attached(model, ExpertLibrary.load(llama_experts)) as fusion:
        ens = _run(EnsembleDecoder(model, fusion, torch.tensor([0.0, 1.0, 0, 0])), PROMPTS, 5)
        fusion.set_expert(1)
        alone = _run(ModelDecoder(model), PROMPTS, 5)
    assert ens == alone


def test_rows_stop_at_eos_or_their_cap(llama_dir):
    model = load_base(llama_dir)
    free = _run(ModelDecoder(model), PROMPTS, STEPS)
    eos = free[0][2]  # the first row's third token ends it there
    ids, mask = left_pad(PROMPTS, 0)
    got = greedy(ModelDecoder(model), ids, mask, torch.tensor([STEPS, 2, 0]), eos)
    cut = free[0].index(eos)
    assert got[0] == free[0][:cut]
    two = free[1][:2]
    assert got[1] == (two[: two.index(eos)] if eos in two else two)
    assert got[2] == []


def test_generate_ids_keeps_the_order_and_batches_alike(llama_dir):
    model = load_base(llama_dir)
    prompts = PROMPTS * 3
    one = generate_ids(lambda t: ModelDecoder(model), prompts, [4] * 9, -1, 0, batch_size=9)
    small = generate_ids(lambda t: ModelDecoder(model), prompts, [4] * 9, -1, 0, batch_size=2)
    assert one == small
    assert one[:3] == _run(ModelDecoder(model), PROMPTS, 4)
    with pytest.raises(LorafuseError, match="no token"):
        generate_ids(lambda t: ModelDecoder(model), [[]], [4], -1, 0)


def test_ensemble_decoder_refuses_bad_weights(llama_dir, llama_experts):
    model = load_base(llama_dir)
    with attached(model, ExpertLibrary.load(llama_experts)) as fusion:
        with pytest.raises(LorafuseError, match="every ensemble weight is zero"):
            EnsembleDecoder(model, fusion, torch.zeros(4))
        with pytest.raises(LorafuseError, match=r"must be \(4,\)"):
            EnsembleDecoder(model, fusion, torch.ones(3))
        with pytest.raises(LorafuseError, match="unknown ensemble level"):
            EnsembleDecoder(model, fusion, torch.ones(4), "geometric")
