"""How the study names methods, kinds and costs in its tables and figures."""

from __future__ import annotations

from lorafuse.study.claims import study_kinds

FAMILIES = ("baseline", "ensembling", "merging", "routing")
BEYOND = "beyond the paper"
BEYOND_MARK = "†"  # a dagger after the name of a method beyond the paper in figures


def ordered(results: dict) -> list[dict]:
    """The methods grouped by family (baselines, ensembling, merging, routing, others),
    each family in results order, the study's experts kind before other kinds."""
    rank = {f: i for i, f in enumerate(FAMILIES)}
    main = study_kinds(results)[0]
    methods = results.get("methods") or []

    def key(i: int) -> tuple:
        m = methods[i]
        return rank.get(m.get("family"), len(FAMILIES)), (m.get("experts") or "private") != main, i

    return [methods[i] for i in sorted(range(len(methods)), key=key)]


def kind_title(kind: str) -> str:
    """'private experts', 'cluster (MBC) experts' or '<kind> experts'."""
    return {"mbc": "cluster (MBC) experts"}.get(kind, f"{kind} experts")


def cost_text(m: dict) -> str:
    """'1 pass, 1.004x FLOPs' from a method's "cost" (relative FLOPs per token)."""
    cost = m.get("cost") or {}
    passes, rel = cost.get("passes"), cost.get("relative_flops")
    parts = []
    if passes is not None:
        parts.append(f"{passes} pass" + ("" if passes == 1 else "es"))
    if rel is not None:
        parts.append(f"{rel:.3f}x FLOPs" if rel < 10 else f"{rel:.1f}x FLOPs")
    return ", ".join(parts) or "cost n/a"


def method_label(m: dict, main: str = "private") -> str:
    """The method's name, with its experts kind when that is not `main`."""
    kind = m.get("experts") or "private"
    return m["name"] if kind == main else f"{m['name']} [{kind}]"


def family_text(m: dict) -> str:
    """The method's family, with "beyond the paper (origin)" for a method the paper does
    not study (its table row's `origin`, recorded in results.json)."""
    family = str(m.get("family", ""))
    return f"{family}, {BEYOND} ({m['origin']})" if m.get("origin") else family


def marked_label(m: dict, main: str = "private") -> str:
    """`method_label` with a dagger when the method is beyond the paper (figures)."""
    label = method_label(m, main)
    return f"{label} {BEYOND_MARK}" if m.get("origin") else label


def beyond_note(methods: list[dict]) -> str | None:
    """'† beyond the paper: PEFT / mergekit, LoraHub' for the origins of `methods`, or
    None when every method is the paper's."""
    origins = list(dict.fromkeys(m["origin"] for m in methods if m.get("origin")))
    return f"{BEYOND_MARK} {BEYOND}: {', '.join(origins)}" if origins else None
