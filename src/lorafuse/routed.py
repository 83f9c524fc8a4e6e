"""Saving and loading a routed model: a Fusion whose every fused layer has a router.

The file format (routed.json + routers.safetensors) is `lorafuse.formats.routed`; this
module builds it from a Fusion and builds routers and a Fusion from it, so it sits above
`lorafuse.model`. `load_routed(model, folder)` loads the experts, attaches them to a base
model and sets the routers in one call; the model keeps its class, so `generate()` works
with the KV cache (each new token is routed at every layer as it is decoded).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lorafuse.errors import LorafuseError
from lorafuse.formats.routed import ROUTERS_NAME, read_routed, read_routers, write_routed
from lorafuse.library import ExpertLibrary
from lorafuse.mixers.routers import ArrowRouter, LinearRouter, set_top_k
from lorafuse.model import Fusion, attach


def routers_of(fusion: Fusion) -> dict[str, nn.Module]:
    """Module path -> router of every fused layer; raises LorafuseError if one is not a router."""
    routers = {name: layer.mixer for name, layer in fusion.layers.items()}
    bad = [n for n, r in routers.items() if not isinstance(r, (LinearRouter, ArrowRouter))]
    if bad:
        raise LorafuseError(
            f"module {bad[0]} has mixer {type(routers[bad[0]]).__name__}, not a router; set "
            "routers with lorafuse.mixers.routers.build_routers before saving"
        )
    kinds = {type(r) for r in routers.values()}
    if len(kinds) > 1:
        raise LorafuseError("every fused layer must use the same kind of router to be saved")
    return routers


def save_routed(
    fusion: Fusion, out: str | Path, settings: dict[str, Any] | None = None, force: bool = False
) -> Path:
    """Save the routers of `fusion` and a reference to its experts' folders at `out`.

    `settings` (JSON-ready) are stored as given (e.g. how the routers were trained).
    Raises LorafuseError when a layer has no router or an expert has no folder, and
    OutputExistsError when `out` exists and not `force`.
    """
    routers = routers_of(fusion)
    lib = fusion.library
    missing = [e.name for e in lib.experts if e.path is None]
    if missing:
        raise LorafuseError(
            f"expert(s) {missing[:3]} have no folder on disk; a routed model references its "
            "experts by folder: save them as PEFT adapters and load the library from there"
        )
    first = next(iter(routers.values()))
    config = {
        "space": fusion.space,
        "router": "arrow" if isinstance(first, ArrowRouter) else "linear",
        "top_k": first.top_k,
        "temperature": getattr(first, "temperature", None),
        "absolute": getattr(first, "absolute", None),
        "experts": [{"name": e.name, "path": str(Path(e.path).resolve())} for e in lib.experts],
        "base_model": lib.base_model,
        "modules": list(routers),
        "settings": settings or {},
    }
    tensors = {f"{m}.{k}": v for m, r in routers.items() for k, v in r.state_dict().items()}
    return write_routed(out, config, tensors, force)


def load_routed(
    model: nn.Module,
    folder: str | Path,
    library: ExpertLibrary | None = None,
    top_k: int | None = None,
) -> Fusion:
    """Attach the saved experts and routers to `model` (a base model); return the Fusion.

    `library` replaces loading the experts from their recorded folders (e.g. when they
    moved); its expert names must match the saved ones, in order. `top_k` overrides the
    saved top-k (None keeps it). Raises LorafuseError for a folder that is not a routed
    model, missing experts or mismatched names and modules.
    """
    config = read_routed(folder)
    names = [e["name"] for e in config["experts"]]
    if library is None:
        paths = [e["path"] for e in config["experts"]]
        gone = [p for p in paths if not Path(p).is_dir()]
        if gone:
            raise LorafuseError(
                f"expert folder(s) {gone[:3]} of routed model {folder} are missing; pass "
                "library=ExpertLibrary.load(<their new folders>)"
            )
        library = ExpertLibrary.load(paths)
    if library.names != names:
        raise LorafuseError(
            f"routed model {folder} was trained over experts {names[:5]}, but the library "
            f"holds {library.names[:5]}; load the same experts in the same order"
        )
    state = read_routers(folder)
    with ExitStack() as stack:  # detached again if anything below fails
        fusion = attach(model, library, config["space"])
        stack.callback(fusion.detach)  # (a callback, not a generator: nothing on collection)
        if set(config["modules"]) != set(fusion.layers):
            raise LorafuseError(
                f"routed model {folder} routes other modules than the experts adapt"
            )
        routers = {}
        for name, layer in fusion.layers.items():
            own = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
            where = f"{Path(folder) / ROUTERS_NAME} module {name}"
            routers[name] = _router(config, own, where).to(layer.A_cat.device)
        if top_k is not None:
            set_top_k(routers, top_k)
        fusion.set_mixers(routers)
        stack.pop_all()
    return fusion


def _router(config: dict[str, Any], state: dict[str, Tensor], where: str) -> nn.Module:
    need = ["prototypes"] if config["router"] == "arrow" else ["weight", "bias"]
    missing = [k for k in need if k not in state]
    if missing or any(state[k].dim() != (2 if k != "bias" else 1) for k in need):
        raise LorafuseError(
            f"{where}: the {config['router']} router needs tensors {need} (2-D, bias 1-D); "
            f"got {sorted(state)}; save the routed model again"
        )
    if config["router"] == "arrow":
        return ArrowRouter(state["prototypes"], config.get("top_k"), config["temperature"])
    N, D = state["weight"].shape
    router = LinearRouter(D, N, top_k=config.get("top_k"), absolute=config.get("absolute"))
    try:
        router.load_state_dict(state)
    except RuntimeError as e:
        detail = str(e).splitlines()[0]
        raise LorafuseError(f"{where}: {detail}; save the routed model again") from None
    return router
