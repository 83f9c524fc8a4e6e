"""Attach an ExpertLibrary to a transformers model as fused layers, and detach it.

`attach` swaps each targeted nn.Linear / Conv1D / bitsandbytes 4-bit or 8-bit layer for a
FusedLoRALinear in place, so the model keeps its class: forward, `generate` and the KV
cache work unchanged. A quantized base layer stays quantized (the experts run beside it);
`refuse_quantized` is the guard for anything that would need its full weight. A Fusion is a
context manager, and `attached(...)` is the form to use: it detaches on every exit path.

    with attached(model, library, "factors") as fusion:
        fusion.set_coefficients(weights)
        logits = model(input_ids).logits
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lorafuse.base_layers import layer_shape, quantized_modules
from lorafuse.errors import LibraryMismatchError, LorafuseError
from lorafuse.fast import choose, describe
from lorafuse.layer import FusedLoRALinear, Mixer, check_space
from lorafuse.library import ExpertLibrary
from lorafuse.mixers.static import Fixed, Uniform


class Fusion:
    """Handle on a model with an expert library attached; set coefficients through it."""

    def __init__(self, model: nn.Module, library: ExpertLibrary, space: str):
        self.model = model
        self.library = library
        self.space = space
        self.layers: dict[str, FusedLoRALinear] = {}
        self.shardable = False

    @property
    def num_experts(self) -> int:
        """N, the number of experts."""
        return len(self.library)

    def set_mixer(self, mixer: Mixer | None) -> None:
        """Use one coefficient provider for every fused layer (None: base model only)."""
        for layer in self.layers.values():
            layer.mixer = mixer

    def set_mixers(self, mixers: Mapping[str, Mixer]) -> None:
        """One coefficient provider per fused layer, keyed by module path (all required)."""
        missing = sorted(set(self.layers) - set(mixers))
        unknown = sorted(set(mixers) - set(self.layers))
        if missing or unknown:
            raise LorafuseError(
                f"per-layer mixers must name every fused module exactly: missing {missing[:3]}, "
                f"unknown {unknown[:3]}"
            )
        for name, mixer in mixers.items():
            self.layers[name].mixer = mixer

    def set_coefficients(self, coefficients: Tensor | Mapping[str, Tensor] | None) -> None:
        """Fixed coefficients: (N,), (B, N) or (B, T, N) for all layers, or per layer.

        A mapping gives each module path its own coefficients (layer-wise merging).
        None removes every expert (the base model).
        """
        if coefficients is None:
            self.set_mixer(None)
        elif isinstance(coefficients, Mapping):
            self.set_mixers({m: self._fixed(c) for m, c in coefficients.items()})
        else:
            self.set_mixer(self._fixed(coefficients))

    def set_expert(self, name_or_index: str | int) -> None:
        """One-hot coefficients on one expert (that expert alone)."""
        i = (
            self.library.index([name_or_index])[0]
            if isinstance(name_or_index, str)
            else int(name_or_index)
        )
        self.set_coefficients(
            torch.nn.functional.one_hot(torch.tensor(i), self.num_experts).float()
        )

    def _fixed(self, c: Tensor) -> Fixed:
        mixer = Fixed(c)
        if mixer.num_experts != self.num_experts:
            raise LorafuseError(
                f"coefficients have {mixer.num_experts} entries but the library has "
                f"{self.num_experts} experts ({', '.join(self.library.names[:5])}...)"
            )
        return mixer

    def replan(self) -> None:
        """Choose every layer's plans again (lorafuse.fast reads its switches now)."""
        for layer in self.layers.values():
            layer.replan()

    def plans(self) -> dict[str, str]:
        """Module path -> one line naming its training and inference plans and why."""
        return {name: describe(layer) for name, layer in self.layers.items()}

    def shard(self, **fsdp) -> nn.Module:
        """Shard the model with FSDP2 (torch.distributed.fsdp.fully_shard, `fsdp` its
        options): each fused layer (its experts, base layer and mixer), then the model.

        Call it in every process of a torch.distributed job, after attach(...,
        shardable=True) and after setting the mixers, before building the optimizer. The
        experts are frozen parameters, so each rank keeps 1/world of them; the mixers'
        gradients are averaged across ranks. Returns the model. Raises LorafuseError for
        a fusion attached without `shardable`.
        """
        if not self.shardable:
            raise LorafuseError(
                "this fusion keeps its experts as buffers, which FSDP copies to every "
                "rank; attach it with shardable=True before sharding"
            )
        from torch.distributed.fsdp import fully_shard

        for layer in self.layers.values():
            fully_shard(layer, **fsdp)
        fully_shard(self.model, **fsdp)
        return self.model

    def mixer_parameters(self) -> list[nn.Parameter]:
        """The distinct trainable parameters of the attached mixers."""
        seen: dict[int, nn.Parameter] = {}
        for layer in self.layers.values():
            if isinstance(layer.mixer, nn.Module):
                for p in layer.mixer.parameters():
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def detach(self) -> nn.Module:
        """Put the original layers back (with weights of their own) and return the model.

        Detaching twice is harmless: the second call has nothing left to put back.
        """
        for name, layer in self.layers.items():
            _set_submodule(self.model, name, layer.release())
        self.layers = {}
        return self.model

    def __enter__(self) -> Fusion:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def attach(
    model: nn.Module,
    library: ExpertLibrary,
    space: str = "factors",
    mixer: Mixer | None = None,
    fast: bool = True,
    shardable: bool = False,
) -> Fusion:
    """Replace each library module of `model` by a FusedLoRALinear; return the Fusion.

    The factors are cast to each base layer's device and dtype (beside a bitsandbytes
    4-bit / 8-bit layer: its compute dtype, else the dtype of the model's first floating
    parameter, its activations). The model's parameters are frozen. Without `mixer` the
    coefficients start uniform. Each layer's plans are chosen by lorafuse.fast.choose
    (`fast=False`: every layer runs its reference forward). `shardable=True` stores the
    experts as frozen parameters so that FSDP (`fully_shard`, after attach) shards them
    instead of copying them to every rank; the layers then run their reference forward
    (FSDP owns the parameters' storage). Raises LibraryMismatchError
    when a library module is
    missing from the model or has another shape, LorafuseError (naming the module and
    its type) when it is a layer lorafuse cannot fuse into.
    """
    check_space(space)
    planner = choose if fast and not shardable else None
    if any(isinstance(m, FusedLoRALinear) for m in model.modules()):
        raise LorafuseError("the model has fused layers already; detach the first Fusion first")
    fusion = Fusion(model, library, space)
    fusion.shardable = shardable
    activations = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    for name, stacked in library.modules.items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise LibraryMismatchError(
                f"the experts adapt module {name}, which the model does not have; the experts "
                f"were trained on another base model ({library.base_model or 'unknown'})"
            ) from None
        layer_shape(base, name)  # a layer of a kind lorafuse fuses into, else LorafuseError
        try:
            fusion.layers[name] = FusedLoRALinear(
                base, stacked, space, name, activations, planner, shardable
            )
        except LorafuseError as e:
            raise LibraryMismatchError(str(e)) from None
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in fusion.layers.items():
        _set_submodule(model, name, layer)
    fusion.set_mixer(mixer if mixer is not None else Uniform(len(library)))
    return fusion


@contextmanager
def attached(
    model: nn.Module,
    library: ExpertLibrary,
    space: str = "factors",
    mixer: Mixer | None = None,
    fast: bool = True,
    shardable: bool = False,
) -> Iterator[Fusion]:
    """`attach` for the length of a `with` block: the model is detached on every exit path.

    Raises what `attach` raises (before the block runs).
    """
    fusion = attach(model, library, space, mixer, fast, shardable)
    try:
        yield fusion
    finally:
        fusion.detach()


def detach_all(model: nn.Module) -> int:
    """Put back the original layer of every fused layer left in `model`; return how many.

    For recovery after an error left a Fusion attached (the next `attach` would refuse).
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FusedLoRALinear)}
    if layers:
        fusion = Fusion(model, None, "factors")  # type: ignore[arg-type]
        fusion.layers = layers
        fusion.detach()
    return len(layers)


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` holds bitsandbytes 4-bit / 8-bit layers (no full-precision weights)."""
    return bool(quantized_modules(model))


def refuse_quantized(model: nn.Module, action: str = "save a merged full model") -> None:
    """Raise LorafuseError if `model` is quantized: `action` would dequantize it silently.

    The message names the first quantized modules and says what to do instead (export
    the merged experts as a PEFT adapter, or load the base model unquantized).
    """
    found = quantized_modules(model)
    if found:
        kinds = "/".join(sorted(set(found.values())))
        names = ", ".join(list(found)[:3]) + (" ..." if len(found) > 3 else "")
        raise LorafuseError(
            f"cannot {action}: the base model is quantized ({len(found)} bitsandbytes "
            f"{kinds} layers: {names}) and has no full-precision weights to merge into; "
            "export the merged experts as a PEFT adapter (lorafuse merge without --base) and "
            "load it on the quantized model, or load the base model unquantized"
        )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
