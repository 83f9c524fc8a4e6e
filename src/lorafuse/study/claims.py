"""The paper's claims, one row per sentence of the paper, decided on a study's results,
then a few comparisons beyond the paper (`EXTRA`: its rivals from PEFT, mergekit, LoraHub).

`TABLE` is declarative: each `Claim` quotes the paper's words with their section, says in
our words what is tested, and lists its parts (each half of a two-part sentence is one
part). A part compares methods chosen by a `Pick`: by name, or by role and the paper tag
each method declares in the METHODS table (`Method.paper`: "fig2", "fig4", "B.2"-"B.5"),
over one of the study's two expert kinds (`experts`: Figure 2's cluster experts;
`private_experts`: Section 5's). The study never matches names by prefix.

A part is decided by a rule of lorafuse.study.verdicts (BEATS, WITHIN, NOT_BEATEN,
EQUIVALENT) over paired per-task differences, or by a statistic of the analyses. A claim
holds when all its parts hold, does not hold when one does not, and otherwise says why it
could not be decided. The paper's printed numbers stand beside ours, verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import Any, Literal

from lorafuse.study.verdicts import (  # noqa: F401  (re-exported: the claims' vocabulary)
    BEATS,
    EQUIVALENCE_MARGIN,
    EQUIVALENT,
    FAILS,
    HOLDS,
    MISSING,
    NOT_BEATEN,
    NOT_CONVERGED,
    RULE,
    UNSURE,
    WITHIN,
    Key,
    Rule,
    _compare,
    _evidence,
    _fmt,
    _why,
    about_as_good,
    beats,
    combine,
    lookup,
    not_beaten,
    not_converged,
    paired,
    stats,
    study_kinds,
    usable,
    within_2se,
)

Kind = Literal["figure", "cluster", "private"]


@dataclass(frozen=True)
class Pick:
    """Methods a part compares: `names`, or every method of the METHODS table with `role`
    (any role when None) and paper tag `tag`, less `exclude`; each over `kind`: "figure"
    (the kind the method mixes in Figure 2: its row's `study_experts`), "cluster" (the
    study's `experts`) or "private" (the study's `private_experts`)."""

    names: tuple[str, ...] = ()
    role: str | None = None
    tag: str | None = None
    kind: Kind = "figure"
    exclude: tuple[str, ...] = ()

    def methods(self) -> list[str]:
        """The method names this pick selects, in the table's order."""
        from lorafuse.methods.registry import METHODS

        if self.names:
            return [n for n in self.names if n not in self.exclude]
        return [
            m.name
            for m in METHODS
            if (self.role is None or m.role == self.role)
            and (self.tag is None or self.tag in m.paper)
            and m.name not in self.exclude
        ]

    def keys(self, kinds: dict[str, str]) -> list[Key]:
        """(name, experts kind) of each selected method, `kinds` = {"cluster": ...,
        "private": ...} the study's two kinds."""
        from lorafuse.methods.registry import BY_NAME

        out = []
        for name in self.methods():
            which = self.kind
            if which == "figure":
                row = BY_NAME.get(name.partition(":")[0])
                which = row.study_experts if row else "cluster"
            out.append((name, kinds[which]))
        return out


@dataclass(frozen=True)
class Compare:
    """A part: every method of `a` against every method of `b` (or the i-th of each with
    `zip`), each pair decided by `rule` on loss(a) - loss(b)."""

    text: str
    a: Pick
    b: Pick
    rule: Rule = BEATS
    zip: bool = False

    def pairs(self, kinds: dict[str, str]) -> list[tuple[Key, Key]]:
        """The (a, b) pairs of method keys compared (a method is never paired with itself)."""
        A, B = self.a.keys(kinds), self.b.keys(kinds)
        pairs = list(zip(A, B)) if self.zip else list(product(A, B))
        return [(x, y) for x, y in pairs if x != y]


@dataclass(frozen=True)
class Statistic:
    """A part decided on a number of the analyses or of a fit: `what` names the test
    ("gap", "sparsity", "not_best", "greedy"); see `_statistic`."""

    text: str
    what: Literal["gap", "sparsity", "not_best", "greedy"]


Part = Compare | Statistic


@dataclass(frozen=True)
class Claim:
    """One sentence of the paper: `quote` (its words), `section`, `claim` (what we test),
    `parts`, and `paper_numbers` (the numbers it prints, verbatim; "" when it prints none).
    A comparison beyond the paper (`EXTRA`) has section BEYOND, no quote, and says in
    `source` where its question comes from."""

    id: int
    section: str
    quote: str
    claim: str
    parts: tuple[Part, ...]
    paper_numbers: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    source: str = ""

    @property
    def beyond(self) -> bool:
        """True for a comparison the paper does not make."""
        return self.section == BEYOND

    @property
    def paper(self) -> str:
        """The paper's words with their section, or where a comparison beyond it comes from."""
        return f"{BEYOND}: {self.source}" if self.beyond else f'{self.section}: "{self.quote}"'


BEYOND = "beyond the paper"
ORACLE = Pick(names=("oracle",))
FIG2 = Pick(tag="fig2")
FIG2_ENSEMBLES = Pick(role="ensembling", tag="fig2")
FIG2_MERGES = Pick(role="merging", tag="fig2")
NO_NUMBERS = "none printed (Figure 2 shows bars)"
SPARSE_SHARE = 0.5  # "only 30% of the coefficients nonzero": fewer than half is sparse

TABLE: tuple[Claim, ...] = (
    Claim(
        1, "Section 3, Key Takeaways",
        "Oracle remains the best approach, leaving room for improvement.",
        "The oracle (task id known) beats every other Figure-2 method",
        (Compare("oracle beats every other Figure-2 method", ORACLE,
                 Pick(tag="fig2", exclude=("oracle",))),),
        NO_NUMBERS,
    ),
    Claim(
        2, "Section 4.4",
        "our SGD-optimized routing not only outperforms all merging strategies but also "
        "surpasses all ensembling approaches and baselines except for the oracle.",
        "SGD routing (route-sgd) beats every Figure-2 merging, ensembling and baseline "
        "method but the oracle",
        (Compare("route-sgd beats every Figure-2 merging method", Pick(names=("route-sgd",)),
                 FIG2_MERGES),
         Compare("route-sgd beats every Figure-2 ensembling method and baseline but the oracle",
                 Pick(names=("route-sgd",)),
                 Pick(names=tuple(n for r in ("ensembling", "baseline")
                                  for n in Pick(role=r, tag="fig2").methods()),
                      exclude=("oracle",)))),
        NO_NUMBERS,
    ),
    Claim(
        3, "Figure 2 (caption)",
        "Our results indicate that ensembling outperforms merging",
        "Every Figure-2 ensembling method (uniform, SGD, distillation) beats every Figure-2 "
        "merging method (uniform, global SGD, layer-wise SGD)",
        (Compare("every Figure-2 ensembling method beats every Figure-2 merging method",
                 FIG2_ENSEMBLES, FIG2_MERGES),),
        NO_NUMBERS,
    ),
    Claim(
        4, "Section 3.1",
        "Notably, it outperforms all baselines except the oracle, which has access to the "
        "task ID",
        "Uniform ensembling beats the Figure-2 baselines but the oracle (shared, Arrow)",
        (Compare("ensemble-uniform beats shared and Arrow (top-4)",
                 Pick(names=("ensemble-uniform",)),
                 Pick(role="baseline", tag="fig2", exclude=("oracle",))),),
        NO_NUMBERS,
    ),
    Claim(
        5, "Section 3, Key Takeaways",
        "Uniform ensembling is a surprisingly competitive approach that can be further "
        "improved by directly optimizing the ensembling coefficients with SGD.",
        "SGD-learned ensemble weights (ensemble-sgd) beat uniform ensembling",
        (Compare("ensemble-sgd beats ensemble-uniform", Pick(names=("ensemble-sgd",)),
                 Pick(names=("ensemble-uniform",))),),
        NO_NUMBERS,
    ),
    Claim(
        6, "Section 3.2.2",
        "this distillation balances performance and computational efficiency, achieving "
        "slightly better accuracy than uniform averaging while requiring only a single "
        "forward pass.",
        "Distillation beats uniform ensembling, and only slightly: it stays within 2 se of "
        "its teacher, the SGD ensemble",
        (Compare("ensemble-distill beats ensemble-uniform", Pick(names=("ensemble-distill",)),
                 Pick(names=("ensemble-uniform",))),
         Compare("slightly: ensemble-distill is within 2 se of its teacher ensemble-sgd",
                 Pick(names=("ensemble-distill",)), Pick(names=("ensemble-sgd",)), WITHIN)),
        NO_NUMBERS,
    ),
    Claim(
        7, "Section 4.1",
        "uniform merging significantly underperforms all ensembling methods and most "
        "baselines, with the exception of the shared expert baseline.",
        "Uniform merging is worse than every Figure-2 ensembling method and than the oracle "
        "and Arrow, and not worse than the shared expert",
        (Compare("every Figure-2 ensembling method beats merge-uniform", FIG2_ENSEMBLES,
                 Pick(names=("merge-uniform",))),
         Compare("the oracle and Arrow (top-4) beat merge-uniform",
                 Pick(role="baseline", tag="fig2", exclude=("shared",)),
                 Pick(names=("merge-uniform",))),
         Compare("the exception: shared does not beat merge-uniform",
                 Pick(names=("merge-uniform",)), Pick(names=("shared",)), NOT_BEATEN)),
        NO_NUMBERS,
    ),
    Claim(
        8, "Section 4.3",
        "Figure 2 shows that global merging unexpectedly outperforms layer-dependent merging",
        "Global SGD merging beats layer-wise SGD merging (the same lr grid and budget)",
        (Compare("merge-sgd-global beats merge-sgd-layer", Pick(names=("merge-sgd-global",)),
                 Pick(names=("merge-sgd-layer",))),),
        NO_NUMBERS,
    ),
    Claim(
        9, "B.3",
        "Figure 5 shows that probability-level ensembling indeed outperforms logit-level "
        "ensembling.",
        "Probability-level uniform ensembling beats logit-level uniform ensembling",
        (Compare("ensemble-uniform beats ensemble-uniform-logits",
                 Pick(names=("ensemble-uniform",)), Pick(names=("ensemble-uniform-logits",))),),
        "none printed (Figure 5 shows bars)",
    ),
    Claim(
        10, "Section 4.1 (B.2)",
        "we found that merging in the low-rank space yields comparable results to merging in "
        "full parameter space.",
        "Low-rank (A, B) uniform merging is equivalent to full-rank uniform merging within "
        f"a margin of {EQUIVALENCE_MARGIN:.0%} of the full-rank loss",
        (Compare("merge-uniform is equivalent to merge-uniform-full",
                 Pick(names=("merge-uniform",)), Pick(names=("merge-uniform-full",)),
                 EQUIVALENT),),
        "none printed (Figure 5 shows bars)",
    ),
    Claim(
        11, "Section 5.3",
        "routing over hierarchical clustering (HC) does not match the performance of routing "
        "with MBC experts",
        "Routing over the cluster experts (route-sgd) beats HC routing over the private "
        "experts (route-hc)",
        (Compare("route-sgd [cluster] beats route-hc [private]", Pick(names=("route-sgd",)),
                 Pick(names=("route-hc",))),),
        NO_NUMBERS,
    ),
    Claim(
        12, "Section 5.3",
        "initializing the routing matrices with Arrow's routing matrices (Arrow HC) improves "
        "the performance of hierarchical routing, surpassing all merging approaches.",
        "Arrow-initialised HC routing beats HC routing, and beats every Figure-2 merging "
        "method",
        (Compare("route-arrow-hc beats route-hc", Pick(names=("route-arrow-hc",)),
                 Pick(names=("route-hc",))),
         Compare("route-arrow-hc beats every Figure-2 merging method",
                 Pick(names=("route-arrow-hc",)), FIG2_MERGES)),
        NO_NUMBERS,
    ),
    Claim(
        13, "Section 5.2",
        "Figure 4 shows that MBC experts outperform private experts for oracle, uniform "
        "ensembling, and uniform merging",
        "Cluster experts beat private experts for the oracle, uniform ensembling and uniform "
        "merging",
        (Compare("each of oracle, ensemble-uniform, merge-uniform: cluster beats private",
                 Pick(names=("oracle", "ensemble-uniform", "merge-uniform"), kind="cluster"),
                 Pick(names=("oracle", "ensemble-uniform", "merge-uniform"), kind="private"),
                 zip=True),),
        "none printed (Figure 4 shows bars)",
    ),
    Claim(
        14, "Section 5.2",
        "However, top-4 Arrow performs better with private experts",
        "Top-4 Arrow over the private experts beats top-4 Arrow over the cluster experts",
        (Compare("arrow-top4: private beats cluster",
                 Pick(names=("arrow-top4",), kind="private"),
                 Pick(names=("arrow-top4",), kind="cluster")),),
        "none printed (Figure 4 shows bars)",
    ),
    Claim(
        15, "B.5",
        "the solution to this linear program results in only 30% of the coefficients "
        "lambda_i being nonzero. [...] this solution achieves an average multi-task loss of "
        "1.150 +- 0.003, which is worse than uniform ensembling achieving a loss of "
        "0.990 +- 0.002.",
        "The minimax-LP ensemble is worse than uniform ensembling, and its coefficients are "
        f"sparse (under {SPARSE_SHARE:.0%} nonzero)",
        (Compare("ensemble-uniform beats ensemble-minimax", Pick(names=("ensemble-uniform",)),
                 Pick(names=("ensemble-minimax",))),
         Statistic(f"under {SPARSE_SHARE:.0%} of the LP coefficients are nonzero", "sparsity")),
        "LP 1.150 +- 0.003 vs uniform 0.990 +- 0.002; 30% of coefficients nonzero",
    ),
    Claim(
        16, "B.4",
        "the multi-task test loss delta between top-1 and top-4 routing is 0.303 for Arrow "
        "with MBC experts, whereas it is only 0.013 for SGD-optimized routing.",
        "Over the cluster experts, SGD routing's top-1 minus top-4 loss gap is smaller than "
        "Arrow's",
        (Statistic("route-sgd's top-1 - top-4 gap beats Arrow's (paired over tasks)", "gap"),),
        "0.303 (Arrow, MBC experts); 0.013 (SGD routing)",
    ),
    Claim(
        17, "Section 5.1",
        "Our findings reveal that 58 out of 256 experts (about 30%) do not rank first on the "
        "very task they were fine-tuned on",
        "Some private experts are not the best expert on their own task (full validation "
        "split)",
        (Statistic("at least one private expert is not best on its own task", "not_best"),),
        "58 out of 256 experts (about 30%)",
    ),
    Claim(
        18, "Section 5.1",
        "using only 150 of 256 experts (about 60%) already recovers the full average "
        "validation loss obtained under private oracle routing.",
        "A greedy subset smaller than the library recovers the private-oracle validation loss",
        (Statistic("greedy selection recovers the private oracle with fewer than all experts",
                   "greedy"),),
        "150 of 256 experts (about 60%)",
    ),
    Claim(
        19, "Section 4.3",
        "While SGD-optimized merging improves over uniform merging, it still falls short of "
        "ensembling",
        "Both SGD merges beat uniform merging, and every Figure-2 ensembling method beats both",
        (Compare("merge-sgd-global and merge-sgd-layer beat merge-uniform",
                 Pick(names=("merge-sgd-global", "merge-sgd-layer")),
                 Pick(names=("merge-uniform",))),
         Compare("every Figure-2 ensembling method beats both SGD merges", FIG2_ENSEMBLES,
                 Pick(names=("merge-sgd-global", "merge-sgd-layer")))),
        NO_NUMBERS,
    ),
)  # fmt: skip


# Comparisons the paper does not make, on methods beyond it (PEFT's and mergekit's merges,
# LoraHub's gradient-free search): decided by the same rules, labelled "beyond the paper".
EXTRA: tuple[Claim, ...] = (
    Claim(
        20, BEYOND, "",
        "TIES merging of the deltas (merge-ties: PEFT's ties, its density chosen on "
        "validation) beats uniform merging",
        (Compare("merge-ties beats merge-uniform", Pick(names=("merge-ties",)),
                 Pick(names=("merge-uniform",))),),
        "none (not in the paper)",
        source="TIES-merging (Yadav et al., 2023) as PEFT and mergekit run it: does resolving "
        "sign conflicts beat the paper's uniform merge?",
    ),
    Claim(
        21, BEYOND, "",
        "DARE-TIES merging of the deltas (merge-dare-ties: its drop rate chosen on "
        "validation) beats uniform merging",
        (Compare("merge-dare-ties beats merge-uniform", Pick(names=("merge-dare-ties",)),
                 Pick(names=("merge-uniform",))),),
        "none (not in the paper)",
        source="DARE (Yu et al., 2024) as PEFT and mergekit run it: does random drop and "
        "rescaling, then TIES' election, beat the paper's uniform merge?",
    ),
    Claim(
        22, BEYOND, "",
        "Merge weights found without gradients (merge-search: CMA-ES within a budget of "
        "forward passes) are at least as good as SGD-learned global merge weights: "
        "merge-sgd-global does not beat merge-search",
        (Compare("merge-sgd-global does not beat merge-search",
                 Pick(names=("merge-search",)), Pick(names=("merge-sgd-global",)),
                 NOT_BEATEN),),
        "none (not in the paper)",
        source="LoraHub (Huang et al., 2024): is a gradient-free search of the merge weights "
        "as good as the paper's SGD on the same objective?",
    ),
)  # fmt: skip
CLAIMS: tuple[Claim, ...] = TABLE + EXTRA


def claims(results: dict) -> list[dict]:
    """One row per claim of `CLAIMS` (the paper's `TABLE`, then the comparisons beyond it,
    `EXTRA`), decided on `results` (a results.json dict).

    Each row: {"id", "section", "quote", "claim" (what we test), "paper" (section: quote;
    "beyond the paper: <source>" for EXTRA), "beyond" (bool), "paper_numbers", "verdict"
    (holds | does not hold | inconclusive | inconclusive (not converged) | not measured),
    "evidence" (each part's numbers), "why" (why it is not
    decided; "" when it is), "methods" ([name, kind] of every method it compared), "parts"
    (each {"text", "rule", "verdict", "evidence", "methods"}), "numbers" (the comparisons,
    each {"a", "b", "diff", "se", "n_tasks", "verdict"}, what was missing and the fits that
    did not converge), "exact_match" (the claim decided on the generated answers' exact
    match, as {"verdict", "evidence", "why", "numbers"}: each method's per-task
    exact-match error 1 - EM in place of its loss; "n/a" for a statistic of the loss
    matrix)}. Never raises on missing methods or failed analyses.
    """
    figure, private = study_kinds(results)
    kinds = {"cluster": figure, "private": private}
    idx, analyses = lookup(results), results.get("analyses") or {}
    rows = [_decide(c, idx, kinds, analyses) for c in CLAIMS]
    errors = answer_errors(idx)
    for c, row in zip(CLAIMS, rows):
        row["exact_match"] = _on_answers(c, errors, kinds, analyses)
    return rows


# On exact match each method's per-task "loss" is its exact-match error, 1 - EM: the same
# rules then read "A beats B" as "A answers more of each task exactly", paired over tasks.
ANSWERS_NOTE = "exact-match error (1 - exact match) per task"
LOSS_ONLY = ("not_best", "greedy")  # statistics of the validation loss matrix


def answer_errors(idx: dict[Key, dict]) -> dict[Key, dict]:
    """Each method of `idx` with its per-task exact-match error (1 - EM) as `per_task`,
    `mean` and `se`; a method without scored answers is marked "no answers"."""
    out = {}
    for key, m in idx.items():
        ans = m.get("answers") or {}
        per_task = ans.get("per_task") or {}
        if m.get("status") != "ok" or "exact_match" not in ans or not per_task:
            status = "no answers" if m.get("status") == "ok" else m.get("status")
            out[key] = {**m, "status": status, "per_task": {}}
            continue
        errors = {t: 1.0 - v["exact_match"] for t, v in per_task.items()}
        em = ans["exact_match"]
        out[key] = {**m, "per_task": errors, "mean": 1.0 - em["mean"], "se": em["se"]}
    return out


def _on_answers(c: Claim, errors: dict[Key, dict], kinds, analyses) -> dict[str, Any]:
    """{"verdict", "evidence", "why", "numbers"} of claim `c` decided on exact match."""
    if all(isinstance(p, Statistic) and p.what in LOSS_ONLY for p in c.parts):
        return {"verdict": "n/a", "evidence": "a statistic of the validation loss matrix",
                "why": "", "numbers": {}}  # fmt: skip
    row = _decide(c, errors, kinds, analyses)
    keep = ("verdict", "evidence", "why", "numbers")
    return {k: row[k] for k in keep}


def claim_methods(claim: Claim, kinds: dict[str, str]) -> list[Key]:
    """The (name, kind) keys a claim compares, in order, each once."""
    keys: dict[Key, None] = {}
    for part in claim.parts:
        for a, b in part.pairs(kinds) if isinstance(part, Compare) else _stat_keys(part, kinds):
            keys.update({a: None, b: None})
    return list(keys)


def _decide(c: Claim, idx: dict[Key, dict], kinds: dict[str, str], analyses: dict) -> dict:
    figure = kinds["cluster"]
    parts, comps, missing, late, extra = [], [], [], [], {}
    for p in c.parts:
        if isinstance(p, Compare):
            res = _compare(idx, p.pairs(kinds), figure, p.rule)
            evidence = _evidence(res, p.rule.op) or (
                f"nothing to compare: the study's cluster and private kinds are both {figure!r}"
            )
            part = {"text": p.text, "rule": p.rule.name, "verdict": res["verdict"],
                    "evidence": evidence}  # fmt: skip
        else:
            res, numbers = _statistic(p, idx, kinds, analyses)
            extra.update(numbers)
            part = {"text": p.text, "rule": p.what, "verdict": res["verdict"],
                    "evidence": res["evidence"]}  # fmt: skip
        part["methods"] = [list(k) for k in _part_keys(p, kinds)]
        parts.append(part)
        comps += res.get("comparisons", [])
        missing += [x for x in res.get("missing", []) if x not in missing]
        late += [x for x in res.get("not_converged", []) if x not in late]
    verdict = combine([p["verdict"] for p in parts])
    if len(parts) == 1:
        evidence = parts[0]["evidence"]
    else:
        evidence = "; ".join(f"({chr(97 + i)}) {p['verdict']}: {p['evidence']}"
                             for i, p in enumerate(parts))  # fmt: skip
    return {
        "id": c.id,
        "section": c.section,
        "quote": c.quote,
        "claim": c.claim,
        "paper": c.paper,
        "beyond": c.beyond,
        "paper_numbers": c.paper_numbers,
        "verdict": verdict,
        "evidence": evidence,
        "why": _why_undecided(verdict, missing, late, parts),
        "methods": [list(k) for k in claim_methods(c, kinds)],
        "parts": parts,
        "numbers": {"comparisons": comps, "missing": missing, "not_converged": late, **extra},
    }


def _why_undecided(verdict: str, missing: list, late: list, parts: list[dict]) -> str:
    if verdict == MISSING:
        open_ = [p["evidence"] for p in parts if p["verdict"] == MISSING]
        return "not measured: " + (", ".join(missing) or "; ".join(open_))
    if verdict == NOT_CONVERGED:
        return "rests on fits that did not converge: " + ", ".join(late)
    if verdict == UNSURE:
        open_ = [p["text"] for p in parts if p["verdict"] == UNSURE]
        return "the paired differences are within 2 se (noise) for: " + "; ".join(open_)
    return ""


GAP_NAMES = ("arrow-top1", "arrow-top4", "route-sgd-top1", "route-sgd-top4")


def _stat_keys(p: Statistic, kinds: dict[str, str]) -> list[tuple[Key, Key]]:
    if p.what == "gap":
        k = [(n, kinds["cluster"]) for n in GAP_NAMES]
        return [(k[0], k[1]), (k[2], k[3])]
    if p.what == "sparsity":
        return [(("ensemble-minimax", kinds["cluster"]),) * 2]
    return []


def _part_keys(p: Part, kinds: dict[str, str]) -> list[Key]:
    pairs = p.pairs(kinds) if isinstance(p, Compare) else _stat_keys(p, kinds)
    return list(dict.fromkeys(k for pair in pairs for k in pair))


def _statistic(p: Statistic, idx, kinds, analyses) -> tuple[dict[str, Any], dict[str, Any]]:
    """({"verdict", "evidence", "missing", ...}, numbers for the row) of a Statistic part."""
    if p.what == "gap":
        return _gap(idx, kinds["cluster"])
    if p.what == "sparsity":
        return _sparsity(idx, kinds["cluster"])
    if p.what == "not_best":
        return _not_best(analyses.get("not_best_on_own_task"))
    return _greedy(analyses.get("greedy"))


def _gap(idx: dict[Key, dict], kind: str) -> tuple[dict, dict]:
    keys = [(n, kind) for n in GAP_NAMES]
    bad = [_why(idx, k) for k in keys if not usable(idx.get(k))]
    if bad:
        return {"verdict": MISSING, "evidence": "missing: " + ", ".join(bad), "missing": bad}, {}
    a1, a4, s1, s4 = (idx[k]["per_task"] for k in keys)
    tasks = [t for t in a1 if t in a4 and t in s1 and t in s4]
    arrow = stats({t: a1[t] - a4[t] for t in tasks})
    sgd = stats({t: s1[t] - s4[t] for t in tasks})
    both = stats({t: (s1[t] - s4[t]) - (a1[t] - a4[t]) for t in tasks})
    verdict = beats(both["diff"], both["se"]) if tasks else MISSING
    late = [f"{k[0]} [{k[1]}] ({why})" for k in keys if (why := not_converged(idx[k]))]
    evidence = (
        f"gap Arrow {_fmt(arrow['diff'], True)} +- {_fmt(arrow['se'])}, "
        f"SGD routing {_fmt(sgd['diff'], True)} +- {_fmt(sgd['se'])}; difference "
        f"{_fmt(both['diff'], True)} +- {_fmt(both['se'])} over {len(tasks)} tasks [{kind}]"
    )
    if late and tasks:
        verdict, evidence = NOT_CONVERGED, evidence + "; not converged: " + ", ".join(late)
    numbers = {"arrow_gap": arrow, "sgd_gap": sgd, "difference": both}
    return {"verdict": verdict, "evidence": evidence, "not_converged": late}, numbers


def _sparsity(idx: dict[Key, dict], kind: str) -> tuple[dict, dict]:
    mm, mu = idx.get(("ensemble-minimax", kind)), idx.get(("ensemble-uniform", kind))
    numbers = {
        "minimax": {"mean": (mm or {}).get("mean"), "se": (mm or {}).get("se")},
        "uniform": {"mean": (mu or {}).get("mean"), "se": (mu or {}).get("se")},
    }
    frac = ((mm or {}).get("fit") or {}).get("nonzero_fraction")
    numbers["nonzero_fraction"] = frac
    if frac is None:
        why = _why(idx, ("ensemble-minimax", kind)) if not usable(mm) else "its fit has none"
        return {"verdict": MISSING, "evidence": f"no nonzero fraction: {why}",
                "missing": [f"ensemble-minimax [{kind}] nonzero fraction"]}, numbers  # fmt: skip
    verdict = HOLDS if frac < SPARSE_SHARE else FAILS
    evidence = f"nonzero coefficients {100 * frac:.0f}% [{kind}]"
    if usable(mm) and usable(mu):
        evidence += (
            f"; minimax {_fmt(mm.get('mean'))} +- {_fmt(mm.get('se'))} vs uniform "
            f"{_fmt(mu.get('mean'))} +- {_fmt(mu.get('se'))}"
        )
    return {"verdict": verdict, "evidence": evidence}, numbers


def _not_best(nb: dict | None) -> tuple[dict, dict]:
    if nb is None:
        return _no_analysis("analyses.not_best_on_own_task"), {}
    if "count" not in nb:
        return _no_analysis(f"analysis failed: {nb.get('error', 'no count')}"), dict(nb)
    n, count = nb["n_experts"], nb["count"]
    evidence = f"{count} of {n} experts ({100 * count / max(n, 1):.0f}%) are not best on own task"
    return {"verdict": HOLDS if count > 0 else FAILS, "evidence": evidence}, dict(nb)


def _greedy(g: dict | None) -> tuple[dict, dict]:
    if g is None:
        return _no_analysis("analyses.greedy"), {}
    if "n_experts" not in g:
        return _no_analysis(f"analysis failed: {g.get('error', 'no n_experts')}"), {}
    at, n = g.get("recovers_at"), g["n_experts"]
    numbers = {"recovers_at": at, "n_experts": n, "private_oracle": g.get("private_oracle")}
    if at is None:
        evidence = f"not recovered with up to {len(g.get('sizes') or [])} experts"
    else:
        evidence = f"recovered with {at} of {n} experts ({100 * at / max(n, 1):.0f}%)"
    evidence += f"; private-oracle loss {_fmt(g.get('private_oracle'))}"
    verdict = HOLDS if at is not None and at < n else FAILS
    return {"verdict": verdict, "evidence": evidence}, numbers


def _no_analysis(what: str) -> dict:
    return {"verdict": MISSING, "evidence": f"missing: {what}", "missing": [what]}
