"""lorafuse: ensemble, merge and route a library of LoRA experts.

The top-level names are imported lazily so that `lorafuse --help` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ExpertLibrary": "lorafuse.library",
    "Expert": "lorafuse.library",
    "FusedLoRALinear": "lorafuse.layer",
    "Fusion": "lorafuse.model",
    "attach": "lorafuse.model",
    "attached": "lorafuse.model",
    "merge": "lorafuse.merge",
    "save_adapter": "lorafuse.merge",
    "save_merged_model": "lorafuse.merge",
    "LorafuseError": "lorafuse.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorafuse' has no attribute {name!r}")
