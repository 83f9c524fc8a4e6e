"""Input-dependent coefficient providers: Arrow (zero-shot) and learned linear routers.

Both route every token at every fused layer from that layer's input x (B, T, D):
- Arrow (paper 2.4, B.1): l(x) = topk_softmax(|x . v_i| / temperature), v_i the top right
  singular vector of s_i B_i A_i (its input-space direction).
- LinearRouter (paper 4.4): l(x) = softmax(W x + b), W (N, D) and b (N,) learned by SGD.

Top-k choice for the learned router: it is trained DENSE (all N coefficients, plain
softmax, as the paper does) and `top_k` is applied afterwards at inference by keeping the
k largest coefficients and renormalising them (B.4's rule, `topk_renormalize`). Setting
`top_k` while training also works without loops: gradients then flow through the kept
coefficients only (a sparse, not straight-through, estimator).

Both expose their linear map of x as `projection` (N, D) and the rest as
`from_projection`, so the fused layer computes x @ projection^T inside its own GEMM
(x is read once for the base layer, the experts' A factors and the router).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor, nn

from lorafuse.errors import LorafuseError
from lorafuse.factors import StackedModule
from lorafuse.mixers.topk import check_k, topk_renormalize, topk_softmax


class Stacks(Protocol):
    """What build_routers reads of a library (an ExpertLibrary): its stacked modules."""

    modules: Mapping[str, StackedModule]


ROUTERS = ("linear", "arrow")
INITS = ("uniform", "arrow")


def arrow_prototypes(stacked: StackedModule) -> Tensor:
    """Arrow's prototype of each expert: the top right singular vector of s_i B_i A_i.

    Batched over the N experts and computed from the factors only: QR of B_i (O, R) and of
    A_i^T (D, R), then an (R, R) SVD of the core, so no (O, D) matrix is formed. Returns
    (N, D) unit vectors in fp32. Zero-padded ranks are exact (padding adds zero singular
    values); the LoRA scaling s_i > 0 does not change the vector, so it is ignored (as in
    mttl and PEFT). The sign is arbitrary for Arrow (it scores |x . v|); it is fixed here
    so that each vector's largest-magnitude entry is positive. An expert whose product is
    zero on this module gets a zero prototype (it then scores 0 for every token).
    """
    A = stacked.A.double()  # (N, R, D)
    B = stacked.B.double()  # (N, O, R)
    _, Rb = torch.linalg.qr(B)  # (N, R, R): B = Qb Rb
    Qa, Ra = torch.linalg.qr(A.transpose(1, 2))  # (N, D, R), (N, R, R): A^T = Qa Ra
    _, S, Vh = torch.linalg.svd(Rb @ Ra.transpose(1, 2))  # B A = Qb (Rb Ra^T) Qa^T
    v = (Qa @ Vh[:, :1].transpose(1, 2)).squeeze(-1)  # (N, D): Qa times the core's top v
    peak = v.gather(1, v.abs().argmax(1, keepdim=True))  # (N, 1)
    sign = torch.where(peak < 0, -1.0, 1.0).to(v.dtype)  # (N, 1)
    v = torch.where(S[:, :1] > 0, v * sign, torch.zeros_like(v))  # (N, D)
    return v.float()


class ArrowRouter(nn.Module):
    """Arrow's zero-shot per-token routing: coefficients (B, T, N) from x (B, T, D).

    scores = |x @ V^T| / temperature (x not normalised, as in Arrow and PEFT); keep the
    `top_k` largest (None: all N) and softmax over them. Raises LorafuseError for a bad
    k or temperature.
    """

    def __init__(self, prototypes: Tensor, top_k: int | None = None, temperature: float = 1.0):
        super().__init__()
        if prototypes.dim() != 2:
            raise LorafuseError(f"prototypes must be (N, D); got {tuple(prototypes.shape)}")
        self.register_buffer("prototypes", prototypes.detach().float().clone())  # (N, D)
        self.num_experts = prototypes.shape[0]
        self.top_k = check_k(top_k, self.num_experts)
        if not temperature > 0:
            raise LorafuseError(f"the Arrow temperature must be > 0; got {temperature}")
        self.temperature = float(temperature)

    @property
    def projection(self) -> Tensor:
        """The prototypes (N, D): the fused layer computes x @ projection^T with its GEMM."""
        return self.prototypes

    def from_projection(self, p: Tensor) -> Tensor:
        """Coefficients (..., N) from the scores before the absolute value, p = x V^T."""
        k = self.num_experts if self.top_k is None else self.top_k
        return topk_softmax(p.abs(), k, self.temperature)  # (..., N)

    def forward(self, x: Tensor) -> Tensor:
        v = self.prototypes
        return self.from_projection(x.to(v.dtype) @ v.T)  # (B, T, N)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, temperature={self.temperature}"


class LinearRouter(nn.Module):
    """A learned per-token router: coefficients softmax(W x + b) (B, T, N) from x (B, T, D).

    `init=None` starts from W = 0, b = 0: uniform coefficients (the uniform merge). `init`
    = Arrow prototypes (N, D) starts from W = prototypes / temperature with `absolute`
    logits |W x| + b, which is exactly dense Arrow; the absolute value keeps Arrow's sign
    invariance (a prototype's sign is arbitrary). The bias b lets the router learn an
    input-independent prior over experts, so the router contains global merging as the
    special case W = 0. Parameters are fp32 whatever the model's dtype. `top_k` (None:
    dense) keeps the k largest coefficients and renormalises them (see the module doc).
    Raises LorafuseError for a bad k, init shape or temperature.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        init: Tensor | None = None,
        top_k: int | None = None,
        absolute: bool | None = None,
        temperature: float = 1.0,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = check_k(top_k, num_experts)
        self.absolute = init is not None if absolute is None else bool(absolute)
        weight = torch.zeros(num_experts, in_features)  # (N, D)
        if init is not None:
            if tuple(init.shape) != (num_experts, in_features):
                raise LorafuseError(
                    f"router init must be ({num_experts}, {in_features}) prototypes; got "
                    f"{tuple(init.shape)}"
                )
            if not temperature > 0:
                raise LorafuseError(f"the router temperature must be > 0; got {temperature}")
            weight = init.detach().float().cpu() / temperature
        self.weight = nn.Parameter(weight.clone())  # (N, D)
        self.bias = nn.Parameter(torch.zeros(num_experts))  # (N,)

    @property
    def projection(self) -> Tensor:
        """The weight W (N, D): the fused layer computes x @ W^T with its own GEMM."""
        return self.weight

    @property
    def softmax_bias(self) -> Tensor | None:
        """b when the coefficients are exactly softmax(|p| + b) or softmax(p + b) (dense)."""
        return self.bias if self.top_k is None else None

    def from_projection(self, p: Tensor) -> Tensor:
        """Coefficients (..., N) from the projection p = x W^T (..., N) (no bias yet)."""
        c = torch.softmax((p.abs() if self.absolute else p) + self.bias, -1)  # (..., N)
        return c if self.top_k is None else topk_renormalize(c, self.top_k)

    def logits(self, x: Tensor) -> Tensor:
        """Router logits (..., N) for x (..., D), in fp32."""
        p = x.to(self.weight.dtype) @ self.weight.T  # (..., N)
        return (p.abs() if self.absolute else p) + self.bias

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        return self.from_projection(x.to(w.dtype) @ w.T)  # (B, T, N)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, absolute={self.absolute}"


def build_routers(
    library: Stacks,
    device: torch.device | str = "cpu",
    router: str = "linear",
    init: str = "uniform",
    top_k: int | None = None,
    temperature: float = 1.0,
) -> dict[str, nn.Module]:
    """One router per module of `library` (module path -> router), on `device`.

    `router`: "linear" (learned; `init` "uniform" or "arrow") or "arrow" (zero-shot, with
    `top_k` and `temperature`). Prototypes come from the library's factors. Set them on
    a fusion of the same library with `fusion.set_mixers(routers)`. Raises
    LorafuseError for an unknown router or init.
    """
    if router not in ROUTERS:
        raise LorafuseError(f"unknown router {router!r}; choose one of {', '.join(ROUTERS)}")
    if init not in INITS:
        raise LorafuseError(f"unknown router init {init!r}; choose one of {', '.join(INITS)}")
    routers: dict[str, nn.Module] = {}
    for name, stacked in library.modules.items():
        N, _, D, _ = stacked.shape
        if router == "arrow":
            r = ArrowRouter(arrow_prototypes(stacked), top_k, temperature)
        else:
            protos = arrow_prototypes(stacked) if init == "arrow" else None
            r = LinearRouter(D, N, protos, top_k, temperature=temperature)
        routers[name] = r.to(device)
    return routers


def set_top_k(routers: dict[str, nn.Module], top_k: int | None) -> None:
    """Set the top-k of every router (None: dense); raises LorafuseError for a bad k."""
    for r in routers.values():
        r.top_k = check_k(top_k, r.num_experts)


def router_parameters(routers: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """Trainable parameters by name `<module path>.<parameter>` (for the training loop)."""
    return {f"{m}.{n}": p for m, r in routers.items() for n, p in r.named_parameters()}
