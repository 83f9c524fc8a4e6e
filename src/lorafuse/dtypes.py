"""The dtypes lorafuse accepts by name (`--dtype`, a spec's `dtype`)."""

from __future__ import annotations

NAMES = ("fp32", "bf16", "fp16")


def dtype(name: str, what: str = "dtype"):
    """'fp32' / 'bf16' / 'fp16' -> the torch dtype; LorafuseError naming `what` otherwise."""
    import torch

    from lorafuse.errors import LorafuseError

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise LorafuseError(f"unknown {what} {name!r}; choose one of {', '.join(NAMES)}")
    return table[name]
