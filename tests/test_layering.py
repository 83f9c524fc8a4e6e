"""Nothing imports from a layer above it (DESIGN.md, "Layers, bottom to top").

Every module under src/lorafuse is parsed with `ast` (nothing is imported), placed in a
layer by the explicit table below, and every `import lorafuse...` in it, at module level,
inside a function or under `if TYPE_CHECKING:`, must name a module of its own layer or a
lower one. A new module fails here until it is placed in the table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "lorafuse"

# Bottom to top. A module belongs to the row of the longest name in it that is its own
# name or a package above it (`lorafuse.mixers.protocol` is core; other mixers are mixers).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "ground",  # exceptions, dtypes, atomic writes, small maths, the one value check
        (
            "lorafuse.errors",
            "lorafuse.dtypes",
            "lorafuse.io",
            "lorafuse.linalg",
            "lorafuse.devices",
            "lorafuse.values",
            "lorafuse.base_layers",  # which base layers a fused layer wraps (shapes, dtype)
            "lorafuse.parallel",  # who this process is under accelerate launch, its share
        ),
    ),
    ("core", ("lorafuse.factors", "lorafuse.mixers.protocol", "lorafuse.data")),
    ("mixers", ("lorafuse.mixers",)),  # static, topk, routers, hierarchical
    ("layer", ("lorafuse.layer",)),
    ("fast", ("lorafuse.fast",)),
    ("formats", ("lorafuse.formats",)),  # on-disk schemas and their I/O only
    ("library", ("lorafuse.library", "lorafuse.check")),
    ("model", ("lorafuse.model",)),
    ("setup", ("lorafuse.spec", "lorafuse.workspace")),
    (
        "uses",  # what a fusion or a library is used for; routed.py attaches, so it is here
        (
            "lorafuse.ensemble",
            "lorafuse.merge",
            "lorafuse.delta_merge",
            "lorafuse.evaluate",
            "lorafuse.report",
            "lorafuse.metrics",
            "lorafuse.answers",
            "lorafuse.cache",
            "lorafuse.matrix",
            "lorafuse.generate",
            "lorafuse.routed",
        ),
    ),
    ("fit", ("lorafuse.fit",)),
    ("select", ("lorafuse.select",)),
    ("methods", ("lorafuse.methods",)),
    ("entry points over methods", ("lorafuse.benchmark", "lorafuse.harness")),
    ("study", ("lorafuse.study",)),
    ("cli", ("lorafuse.cli",)),
    ("package", ("lorafuse",)),  # __init__: lazy names only, by string (importlib)
]

# Upward imports that stay, each with its reason.
EXCEPTIONS: dict[tuple[str, str], str] = {}

# Upward imports being removed now; each entry goes when its import does.
TEMPORARY: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    """`src/lorafuse/fit/exact.py` -> `lorafuse.fit.exact` (a package's __init__ -> the package)."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """Index in LAYERS of `module`; fails naming a module the table does not place."""
    best, where = "", None
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, where = name, i
    assert where is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return where


def imports_of(module: str) -> list[tuple[int, str]]:
    """(line, imported lorafuse module) for every import in `module`, however nested."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` packages up
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:  # `from lorafuse.formats import routed` names a module
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if sub in MODULES else base))
    return sorted({(line, name) for line, name in found if name.split(".")[0] == "lorafuse"})


def test_every_module_is_placed():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_layer_above(module):
    mine = layer_of(module)
    bad = []
    for line, target in imports_of(module):
        edge = (module, target)
        if layer_of(target) > mine and edge not in EXCEPTIONS and edge not in TEMPORARY:
            bad.append(
                f"{MODULES[module].relative_to(SRC.parent)}:{line} imports {target} "
                f"({LAYERS[layer_of(target)][0]}) from layer {LAYERS[mine][0]}"
            )
    assert not bad, "imports from a layer above:\n" + "\n".join(bad)


def test_every_exception_is_still_needed():
    for module, target in EXCEPTIONS:
        assert (module, target) in {(module, t) for _, t in imports_of(module)}, (
            f"{module} no longer imports {target}: drop it from EXCEPTIONS"
        )
        assert layer_of(target) > layer_of(module), f"{module} -> {target} is not upward"
