"""The plans' tests run their layers' Functions at any size (pico layers, a few tokens)."""

from __future__ import annotations

import pytest

from lorafuse.fast import plans


@pytest.fixture(autouse=True)
def functions_at_any_size(monkeypatch):
    """MIX_WORK = 0: a train-mix plan runs Project and Mix even for a few tokens."""
    monkeypatch.setattr(plans, "MIX_WORK", 0)
