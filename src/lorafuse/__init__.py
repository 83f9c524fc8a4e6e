"""lorafuse: ensemble, merge and route a library of LoRA experts.

The top-level names are imported lazily so that `lorafuse --help` never imports torch.
Where an exported name is also a submodule's (`merge`), `lorafuse.merge` is the function:
importing the submodule (`from lorafuse.merge import ...`) does not rebind it.
"""

from __future__ import annotations

import importlib
import sys
import types
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
    "delta_merge": "lorafuse.delta_merge",
    "check_experts": "lorafuse.check",
    "save_adapter": "lorafuse.merge",
    "save_merged_model": "lorafuse.merge",
    "LorafuseError": "lorafuse.errors",
    "Workspace": "lorafuse.workspace",
    "generate_text": "lorafuse.methods.run",
    "generate_answers": "lorafuse.methods.run",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorafuse' has no attribute {name!r}")


class _Package(types.ModuleType):
    # Python binds a submodule to its package's attribute when it is imported; an exported
    # name (the function `merge`) must keep answering for itself, so that binding is refused.
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
