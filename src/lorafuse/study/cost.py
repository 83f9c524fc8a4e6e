"""Inference cost of a method, relative to the base model (the paper's cost axis).

Counted per generated token: forward passes of the base model, and the multiply-adds
(2 FLOPs each) the experts add in the targeted linear layers. The base model's FLOPs are
2 x its matrix parameters (linear layers and the output head; attention scores and
norms are left out, as in the usual 2N estimate). Per fused module with inputs D,
outputs O and rank R:
- one LoRA (an expert, a distilled adapter): 2 R (D + O);
- a merge folded into the weights: 0 (same cost as the base model);
- routing over N experts in the factors space: 2 N R (D + O) plus the router 2 D N;
  top-k routing gathers k experts: 2 k R (D + O) + 2 D N;
- HC routing over C merged cluster experts: 2 C R (D + O) + 2 D C;
- ensembling k experts: k passes, each with one LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorafuse.methods.method import Cost


@dataclass(frozen=True)
class Shapes:
    """The fused modules' (D, O, R) of a library and the base model's FLOPs per token."""

    modules: list[tuple[int, int, int]]  # (D, O, R) per module, R the largest expert rank
    experts: int
    base_flops: float

    def lora(self, count: float = 1.0) -> float:
        """FLOPs per token of `count` experts applied in every module (factors space)."""
        return sum(2.0 * count * R * (D + O) for D, O, R in self.modules)

    def router(self, outputs: int) -> float:
        """FLOPs per token of a linear router D -> outputs in every module."""
        return sum(2.0 * D * outputs for D, _, _ in self.modules)


def library_shapes(model, library) -> Shapes:
    """Shapes of `library`'s modules and the FLOPs of `model` (matrix parameters x 2)."""
    import torch

    modules = []
    for m in library.modules.values():
        N, O, R = m.B.shape
        modules.append((int(m.A.shape[2]), int(O), int(R)))
    weights = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(mod, torch.nn.Embedding):
            weights += w.numel()
    head = model.get_output_embeddings()
    if head is not None and isinstance(head.weight, torch.Tensor):
        tied = any(
            head.weight is e.weight for e in model.modules() if isinstance(e, torch.nn.Embedding)
        )
        if tied:
            weights += head.weight.numel()
    return Shapes(modules, len(library), 2.0 * weights)


def method_cost(cost: Cost, settings: dict[str, Any], shapes: Shapes) -> dict:
    """{"passes", "added_flops_per_token", "relative_flops", "rule"} of one evaluated method.

    `cost` is what the method declares in the table; `settings` its evaluation settings
    (passes, top_k, clusters ...), which say how many passes, experts or clusters it used.
    """
    passes = int(settings.get("passes", 1) or 1)
    N = shapes.experts
    if cost.folded or cost.experts == 0:
        added = 0.0
        rule = "merge folded into the weights" if cost.folded else "the base model"
    elif cost.router == "clusters":
        C = int(settings.get("clusters") or N)
        added, rule = shapes.lora(C) + shapes.router(C), f"router over {C} merged clusters"
    elif cost.router == "experts":
        k = min(int(settings.get("top_k") or N), N) if cost.experts == "top_k" else N
        added = shapes.lora(k) + shapes.router(N)
        rule = f"router + {k} of {N} experts per token"
    elif cost.passes == "per expert":
        added, rule = shapes.lora(), f"{passes} passes, one expert each"
    else:  # oracle, shared, single, distill: one LoRA
        added, rule = shapes.lora(), "one LoRA"
    relative = passes * (shapes.base_flops + added) / shapes.base_flops
    return {
        "passes": passes,
        "added_flops_per_token": added,
        "relative_flops": relative,
        "rule": rule,
    }
