"""The devices lorafuse accepts by name (`--device`, a spec's or config's `device`)."""

from __future__ import annotations

import re

from lorafuse.errors import LorafuseError

DEVICE_RE = re.compile(r"^(cpu|mps|meta|(cuda|xpu)(:\d+)?)$")


def device(name: str, what: str = "device"):
    """'cpu' / 'cuda' / 'cuda:N' / 'mps' / 'xpu[:N]' -> a torch.device that exists here.

    Raises LorafuseError naming `what` for a malformed name or a device this machine
    does not have (no CUDA build, no GPU, an index past the last GPU).
    """
    import torch

    if not isinstance(name, str) or not DEVICE_RE.match(name):
        raise LorafuseError(
            f"{what} {name!r} is not a device; use cpu, cuda, cuda:N (a GPU index), mps or xpu"
        )
    dev = torch.device(name)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise LorafuseError(
                f"{what} {name!r}: torch sees no CUDA GPU on this machine (torch "
                f"{torch.__version__}); use cpu, or a CUDA build of torch on a GPU machine"
            )
        if dev.index is not None and dev.index >= n:
            raise LorafuseError(f"{what} {name!r}: this machine has {n} CUDA GPU(s), 0 to {n - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise LorafuseError(f"{what} {name!r}: MPS is not available here; use cpu")
    elif dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise LorafuseError(f"{what} {name!r}: no Intel XPU is available here; use cpu")
    return dev
