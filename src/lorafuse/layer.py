"""FusedLoRALinear: a base linear layer plus N stacked LoRA experts mixed by coefficients.

Two mixing spaces, each two GEMMs whose inner size is N*R over the concatenated factors:
- `factors` (the paper, mttl): y = W x + (sum_i l_i s_i B_i)(sum_i l_i A_i) x
- `deltas`  (full rank, PEFT):  y = W x + sum_i l_i s_i B_i A_i x
No Python loop over experts, no per-token (D, R) matrices and no (tokens, N, O) tensor.
With one-hot coefficients both reduce exactly to the single expert s_i B_i A_i x.

This module is the reference: `forward` and `delta` are the formula above, and `mix` is
the one mixing step every path uses. Speed-ups live in lorafuse.fast as plans: small
objects with a straight forward, one for training and one for inference, which a
`planner` (given by lorafuse.model.attach: lorafuse.fast.choose) picks for this layer
whenever its mixer is set or it moves to another device or dtype. This module imports
nothing from lorafuse.fast; tests/fast prove every plan equals the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lorafuse.base_layers import base_shape, compute_dtype, layer_shape
from lorafuse.errors import LorafuseError
from lorafuse.factors import SPACES, StackedModule, check_space
from lorafuse.mixers.protocol import Mixer

__all__ = ["SPACES", "FusedLoRALinear", "Mixer", "Plan", "base_shape", "check_space", "mix"]

Plan = Callable[[Tensor], Tensor]  # x (..., D) -> the layer's output (..., O)


def mix(u: Tensor, l: Tensor, space: str) -> tuple[Tensor, Tensor | None]:
    """The mixing step: z (M, R, N) with delta = z.flatten(1) @ B_cat, and h.

    u (M, R, N) = the experts' projections A_i x (rank-major), l (1, N) or (M, 1, N) the
    coefficients; `deltas`: z = l_i A_i x; `factors`: h = (sum_j l_j A_j) x (M, R, 1) and
    z = l_i h (h is returned for a backward pass; None in the deltas space).
    """
    if space == "deltas":
        return u * l, None  # (M, R, N)
    h = (u * l).sum(-1, keepdim=True)  # (M, R, 1)
    return h * l, h  # (M, R, N)


class FusedLoRALinear(nn.Module):
    """`base(x)` plus N LoRA experts mixed by the coefficients `mixer(x)` returns.

    The mixer (lorafuse.mixers.protocol.Mixer: a Module or any callable; None: the base
    layer alone) returns (N,), (B, N) or (B, T, N) coefficients for input x of shape
    (B, T, D) (or (T, D) with (N,) / (T, N) coefficients). Gradients flow to the mixer's
    parameters; the experts' factors are buffers (frozen). The base layer is an
    nn.Linear, a Conv1D or a bitsandbytes 4-bit / 8-bit layer (lorafuse.base_layers): the
    base output always comes from it, and the experts compute in its weight's dtype, or
    beside a quantized layer in its compute dtype (`dtype`, the model's activations, when
    it names none), x cast to it and back.

    `planner(layer)` returns (training plan, inference plan, why): callables x -> output
    or None (the reference), and a line saying why. It runs when the mixer is set, on
    `replan()` and after a move (`.to()`, `.half()`); without one the layer runs its
    reference forward. A plan serves inputs of the layer's dtype outside autocast; the
    others take the reference. `shardable`: the experts' factors are frozen parameters,
    not buffers, so that FSDP shards them (give no planner then: a plan points the
    layer's tensors into a joint buffer, and FSDP owns their storage). Raises
    LorafuseError for a layer of another kind, when the experts' shape is not the base
    layer's, or the space is unknown.
    """

    def __init__(
        self,
        base: nn.Module,
        stacked: StackedModule,
        space: str,
        name: str = "",
        dtype: torch.dtype | None = None,
        planner: Callable | None = None,
        shardable: bool = False,
    ):
        super().__init__()
        N, R, D, O = stacked.shape
        shape = layer_shape(base, name)
        if shape != (D, O):
            raise LorafuseError(
                f"module {name}: the model's layer is (in={shape[0]}, out={shape[1]}) but the "
                f"experts expect (in={D}, out={O}); the experts were trained on a different "
                "base model"
            )
        self.base = base
        self.name = name
        self.space = check_space(space)
        self.num_experts, self.rank, self.out_features = N, R, O
        like = {"device": base.weight.device, "dtype": compute_dtype(base, dtype)}
        # Rank-major order, row r*N + i = expert i's r-th factor: the products with the
        # coefficients (M, R, N) then run along N, not along the short R (vectorised).
        A = stacked.A.to(**like).transpose(0, 1).reshape(R * N, D)
        B = stacked.scaled_B().to(**like).permute(2, 0, 1).reshape(R * N, O)
        if shardable:  # frozen parameters: FSDP shards those (it replicates buffers)
            self.A_rows = nn.Parameter(A, requires_grad=False)  # (R*N, D)
            self.B_cat = nn.Parameter(B, requires_grad=False)  # (R*N, O)
        else:
            self.register_buffer("A_rows", A, persistent=False)  # (R*N, D)
            self.register_buffer("B_cat", B, persistent=False)  # (R*N, O), scalings folded in
        self.planner = planner
        self.state: dict = {}  # what the planner keeps between plans (dropped on a move)
        self.mixer: Mixer | None = None  # chooses the plans (see __setattr__)

    @property
    def A_cat(self) -> Tensor:
        """The experts' A factors side by side (D, R*N), rank-major (column r*N + i)."""
        return self.A_rows.T

    def __setattr__(self, name: str, value) -> None:
        if name != "mixer":
            return super().__setattr__(name, value)
        # Any callable: a Module (registered) or a plain function; then choose the plans.
        self._modules.pop("mixer", None)
        self.__dict__.pop("mixer", None)
        if isinstance(value, nn.Module):
            super().__setattr__(name, value)
        else:
            object.__setattr__(self, name, value)
        self.replan()

    def replan(self) -> None:
        """Choose the training and inference plans again (the planner reads the
        environment now); call it after changing a mixer in place (e.g. its top-k)."""
        plans = (None, None, "reference: no planner")
        if self.mixer is None:
            plans = (None, None, "base layer alone: no mixer")
        elif self.planner is not None:
            plans = self.planner(self)
        self.train_plan, self.inference_plan, self.why = plans

    def forward(self, x: Tensor) -> Tensor:
        mixer = self.mixer
        if mixer is None:
            return self.base(x)  # (..., O)
        plan = self.train_plan if torch.is_grad_enabled() else self.inference_plan
        if (
            plan is not None
            and x.dtype == self.A_rows.dtype
            and not torch.is_autocast_enabled(x.device.type)
        ):
            return plan(x)  # (..., O)
        return self.base(x) + self.delta(x, mixer(x))  # (..., O)

    def delta(self, x: Tensor, coefficients: Tensor) -> Tensor:
        """The mixed experts' contribution for input x (..., D) -> (..., O).

        `coefficients` (N,), (B, N) or (B, T, N); raises LorafuseError when they do not fit.
        """
        N, R = self.num_experts, self.rank
        dtype = x.dtype  # beside a quantized base the experts' compute dtype may differ
        x = x.to(self.A_rows.dtype)
        l = self.token_coefficients(coefficients, x).unsqueeze(-2)  # (1, N) or (M, 1, N)
        u = x.reshape(-1, x.shape[-1]) @ self.A_cat  # (M, R*N): A_i x, rank-major
        z, _ = mix(u.unflatten(-1, (R, N)), l, self.space)  # (M, R, N)
        y = (z.flatten(-2) @ self.B_cat).view(*x.shape[:-1], self.out_features)
        return y if dtype == x.dtype else y.to(dtype)  # (..., O), autocast's dtype kept

    def token_coefficients(self, c: Tensor, x: Tensor) -> Tensor:
        """Coefficients c as (N,) or one row per token (M, N), M = x.numel() / D.

        Raises LorafuseError when c does not end in N or its shape does not fit x.
        """
        N = self.num_experts
        if c.shape[-1] != N:
            raise LorafuseError(
                f"module {self.name}: coefficients of shape {tuple(c.shape)} do not end in "
                f"N={N} experts"
            )
        c = c.to(dtype=x.dtype, device=x.device)
        if c.dim() == 1:
            return c  # (N,)
        fits = all(a in (1, b) for a, b in zip(c.shape[:-1], x.shape[:-1]))
        if c.dim() == x.dim() and fits:
            return c.expand(*x.shape[:-1], N).reshape(-1, N)  # (M, N)
        if c.dim() == 2 and x.dim() == 3 and fits:  # one vector per sequence
            return c[:, None, :].expand(*x.shape[:-1], N).reshape(-1, N)  # (M, N)
        raise LorafuseError(
            f"module {self.name}: coefficients of shape {tuple(c.shape)} do not fit input "
            f"{tuple(x.shape)}; use (N,), (B, N) or (B, T, N)"
        )

    def _apply(self, fn, recurse=True):
        # .to(), .half(), ...: the planner's state may hold the old device's tensors
        # (and the base weight as a view of one): drop it and choose the plans again.
        self.state = {}
        super()._apply(fn, recurse)
        self.replan()
        return self

    def release(self) -> nn.Module:
        """The base layer, its parameters with storage of their own (not views of a
        plan's buffer); this layer then runs its reference forward."""
        self.planner, self.state = None, {}
        self.replan()
        for p in self.base.parameters(recurse=False):
            if p.untyped_storage().nbytes() != p.nbytes:
                p.data = p.data.clone()
        return self.base

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, rank={self.rank}, space={self.space}"
