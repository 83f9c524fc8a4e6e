"""K LoRA experts trained at once in one model: one base forward for all of them.

Every target nn.Linear is wrapped by a StackedLoRALinear holding K experts' factors
A (K, R, D) and B (K, O, R). A batch is laid out expert-major: rows [k*b, (k+1)*b) belong
to expert k, so each wrapped layer adds its delta with two batched GEMMs over (K, b*T)
rows and never loops over experts in Python. Summing the K experts' own mean losses gives
each expert exactly the gradient it would get alone, and AdamW is elementwise, so one
optimizer over the stacked tensors is K independent optimizers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def fast_dropout(x: Tensor, p: float) -> Tensor:
    """Inverted dropout with the mask drawn as 16-bit integers (p rounded to 1/65536).

    Four mask entries per 64-bit random draw: about 3x cheaper on CPU than
    `nn.functional.dropout`, whose float draws dominate a tiny model's training step.
    """
    n = x.numel()
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    bits = bits.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
    drop = round(p * 65536)
    keep = bits >= -32768 + drop  # P(keep) = 1 - drop / 65536
    return x * keep / (1 - drop / 65536)


class SharedDropout:
    """Dropout whose mask is reused by consecutive layers reading the same tensor.

    q/k/v (and gate/up) read one hidden-state tensor; drawing one mask for it instead of
    one per layer saves a third of the random numbers, which dominate a tiny model's step
    on CPU. Each layer still sees a dropout(p) of its input.
    """

    def __init__(self, p: float):
        self.p, self.last, self.dropped = p, None, None

    def __call__(self, x: Tensor, training: bool) -> Tensor:
        """dropout(x), the same draw as the previous call when x is the same tensor."""
        if not training or self.p == 0:
            return x
        if self.last is not x:
            self.last, self.dropped = x, fast_dropout(x, self.p)
        return self.dropped

    def clear(self) -> None:
        """Forget the cached tensor (call after each step)."""
        self.last = self.dropped = None


class StackedLoRALinear(nn.Module):
    """`base(x)` plus, for each expert k, scaling * B_k A_k dropout(x) on its own rows."""

    def __init__(
        self, base: nn.Linear, A0: Tensor, experts: int, scaling: float, dropout: SharedDropout
    ):
        super().__init__()
        R, D = A0.shape
        self.base = base
        self.K, self.scaling, self.dropout = experts, scaling, dropout
        self.A = nn.Parameter(A0.unsqueeze(0).repeat(experts, 1, 1))  # (K, R, D)
        self.B = nn.Parameter(torch.zeros(experts, base.out_features, R))  # (K, O, R)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # (K*b, T, O)
        Kb, T, D = x.shape
        h = self.dropout(x, self.training).reshape(self.K, (Kb // self.K) * T, D)  # (K, b*T, D)
        h = torch.bmm(h, self.A.transpose(1, 2))  # (K, b*T, R)
        h = torch.bmm(h, self.B.transpose(1, 2))  # (K, b*T, O)
        return y + self.scaling * h.reshape(Kb, T, -1)


def lora_init(model: nn.Module, targets: list[str], r: int, seed: int) -> dict[str, Tensor]:
    """PEFT's default LoRA init of A for each target module, drawn from `seed`.

    A ~ U(-1/sqrt(D), 1/sqrt(D)) (kaiming_uniform with a=sqrt(5)), shape (R, D); B starts at
    zero. Every expert starts from the same A, as the paper's library does.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in target_names(model, targets):
        D = model.get_submodule(name).in_features
        out[name] = (torch.rand(r, D, generator=g) * 2 - 1) / math.sqrt(D)
    return out


def target_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the nn.Linear modules whose last path component is in `targets`, sorted."""
    return sorted(
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.split(".")[-1] in targets
    )


def attach_stacked(
    model: nn.Module, init: dict[str, Tensor], experts: int, scaling: float, dropout: float
) -> dict[str, StackedLoRALinear]:
    """Wrap each module of `init` in `model` by a StackedLoRALinear of `experts` experts.

    Freezes the base parameters; returns {module name: wrapper}.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    shared = SharedDropout(dropout)
    layers = {}
    for name, A0 in init.items():
        parent, _, child = name.rpartition(".")
        layer = StackedLoRALinear(model.get_submodule(name), A0, experts, scaling, shared)
        setattr(model.get_submodule(parent), child, layer)
        layers[name] = layer
    return layers


def expert_factors(
    layers: dict[str, StackedLoRALinear], k: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """{module: (A (R, D), B (O, R))} of expert k, detached copies."""
    return {n: (l.A[k].detach().clone(), l.B[k].detach().clone()) for n, l in layers.items()}
