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


class LorafuseWarning(UserWarning):
    """Something a user would want to hear about that does not stop the command (the CLI
    prints it as a `warning:` line): merge weights that scale the update, a capped rank."""


class FileFormatError(LorafuseError):
    """A file lorafuse reads is not valid JSON, or a field of it has the wrong type or value."""
