"""Errors for bad benchmark data, presets and training settings."""

from __future__ import annotations

from lorafuse.errors import LorafuseError


class DataError(LorafuseError):
    """Task data, a preset or a task name is unusable; the message says what to fix."""
