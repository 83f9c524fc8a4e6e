"""Exceptions lorafuse raises for bad user input.

Every message names the offending file, expert, module or value and says what would fix
it. The CLI turns these into a red message and a non-zero exit; library code never exits.
"""

from __future__ import annotations


class LorafuseError(Exception):
    """Base class of the errors a user can fix (bad input, bad settings, bad paths)."""


class ExpertError(LorafuseError):
    """An expert (a PEFT adapter folder) cannot be read or is not plain LoRA."""


class LibraryMismatchError(LorafuseError):
    """Experts disagree with each other or with the base model (modules, shapes, base)."""


class OutputExistsError(LorafuseError):
    """The output path exists already and overwriting was not asked for."""
