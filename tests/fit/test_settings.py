"""The loop's one settings class: the benchmark's knobs validated like the fits', the
decay default, the step budget."""

from __future__ import annotations

import pytest

from lorafuse.errors import LorafuseError
from lorafuse.fit.settings import SGDSettings, budget


@pytest.mark.parametrize(
    "bad",
    [{"warmup_steps": -1}, {"warmup_steps": 2.5}, {"floor": 1.5}, {"floor": -0.1},
     {"max_grad_norm": 0.0}, {"decay": "yes"}, {"betas": (0.9,)}, {"betas": (0.9, 1.0)},
     {"betas": 0.9}],
)  # fmt: skip
def test_bad_values_are_named(bad):
    name = next(iter(bad))
    with pytest.raises(LorafuseError, match=name):
        SGDSettings(**bad)


def test_defaults_are_the_fits_and_json_betas_are_read_back():
    s = SGDSettings()
    assert (s.warmup_steps, s.floor, s.decay, s.max_grad_norm, s.betas) == (
        None, 0.0, None, None, (0.9, 0.999)
    )  # fmt: skip
    assert SGDSettings(betas=[0.9, 0.98]).betas == (0.9, 0.98)


def test_decay_follows_the_budget_unless_set():
    assert SGDSettings(epochs=3).decays() is True
    assert SGDSettings(epochs=None, max_steps=10).decays() is False  # until a plateau
    assert SGDSettings(epochs=None, max_steps=10, decay=True).decays() is True  # benchmark
    assert SGDSettings(epochs=3, decay=False).decays() is False


def test_budget_is_the_smaller_of_epochs_and_the_cap():
    assert budget(SGDSettings(epochs=2), 10) == (20, "epochs")
    assert budget(SGDSettings(epochs=2, max_steps=20), 10) == (20, "step cap")
    assert budget(SGDSettings(epochs=None, max_steps=7), 10) == (7, "step cap")
