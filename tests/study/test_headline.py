"""The report's headline: the best task-agnostic method and the cheapest within 2 se of
it, checked against an independent computation on a hand-made results dict."""

from __future__ import annotations

import html

import numpy as np
import pytest

from lorafuse.study.headline import best_and_cheapest, headline
from lorafuse.study.render import render

TASKS = [f"task_{i:02d}" for i in range(30)]
# (name, family, experts, mean, passes, relative FLOPs)
METHODS = [
    ("base", "baseline", "private", 1.40, 1, 1.0),
    ("shared", "baseline", "private", 1.20, 1, 1.004),
    ("oracle", "baseline", "private", 0.70, 1, 1.004),  # best of all, but needs task ids
    ("ensemble-uniform", "ensembling", "private", 0.900, 10, 10.05),
    ("route-sgd", "routing", "private", 0.895, 1, 1.31),
    ("merge-sgd-global", "merging", "private", 0.896, 1, 1.004),
    ("merge-uniform", "merging", "private", 1.10, 1, 1.0),
    ("route-sgd", "routing", "mbc", 0.95, 1, 1.04),
]


def hand_made(methods=METHODS, seed: int = 0, noise: float = 0.004) -> dict:
    rng = np.random.default_rng(seed)
    level = rng.normal(0.0, 0.3, len(TASKS))  # (T,) shared difficulty: pairing matters
    records = []
    for name, family, kind, mean, passes, rel in methods:
        losses = mean + level + rng.normal(0.0, noise, len(TASKS))  # (T,)
        records.append({
            "name": name, "family": family, "experts": kind, "status": "ok",
            "mean": float(losses.mean()), "se": float(losses.std(ddof=1) / np.sqrt(len(TASKS))),
            "per_task": dict(zip(TASKS, map(float, losses))),
            "cost": {"passes": passes, "relative_flops": rel},
        })  # fmt: skip
    records.append({"name": "route-x", "family": "routing", "experts": "private",
                    "status": "failed", "error": "boom", "mean": None, "se": None,
                    "per_task": {}, "cost": {"passes": 1, "relative_flops": 0.5}})  # fmt: skip
    return {"config": {"name": "hand", "experts": "private"}, "methods": records}


def independent(results: dict):
    """Best and cheapest-within-2-se by a direct computation (paired over all tasks)."""
    fusion = ("ensembling", "merging", "routing")
    pool = [m for m in results["methods"] if m["status"] == "ok" and m["family"] in fusion]
    best = pool[int(np.argmin([m["mean"] for m in pool]))]
    b = np.array([best["per_task"][t] for t in TASKS])
    near = []
    for m in pool:
        d = np.array([m["per_task"][t] for t in TASKS]) - b  # (T,)
        diff, se = d.mean(), d.std(ddof=1) / np.sqrt(len(d))
        if diff <= 2 * se:
            near.append((m["cost"]["relative_flops"], m["cost"]["passes"], m["mean"], m, diff, se))
    near.sort(key=lambda x: x[:3])
    return best, near[0][3], near[0][4], near[0][5]


def test_best_and_cheapest_match_an_independent_computation():
    res = hand_made()
    best, cheapest, how = best_and_cheapest(res)
    want_best, want_cheapest, diff, se = independent(res)
    assert best is want_best and cheapest is want_cheapest
    assert (best["name"], cheapest["name"]) == ("route-sgd", "merge-sgd-global")  # a real case
    assert how["rule"] == "paired" and how["n_tasks"] == len(TASKS)
    assert how["diff"] == pytest.approx(diff) and how["se"] == pytest.approx(se)


def test_the_three_lines():
    res = hand_made()
    best, cheapest, diff, se = independent(res)
    lines = headline(res)
    assert len(lines) == 3
    assert lines[0].startswith("Best task-agnostic method: route-sgd (routing)")
    assert f"{best['mean']:.4f} ± {best['se']:.4f}" in lines[0]
    assert "1 forward pass, 1.310x the base model's FLOPs per token" in lines[0]
    assert lines[1].startswith("Cheapest within 2 se of it: merge-sgd-global (merging)")
    assert f"{cheapest['mean']:.4f} ± {cheapest['se']:.4f}" in lines[1] and "1.004x" in lines[1]
    assert f"{diff:+.4f} ± {se:.4f}" in lines[1]
    assert f"paired per-task difference over {len(TASKS)} tasks" in lines[1]
    assert "oracle" not in lines[0] + lines[1]  # it needs task ids
    assert lines[2].startswith("Baselines, for context") and "oracle" in lines[2]
    assert lines[2].index("oracle") < lines[2].index("shared") < lines[2].index("base ")


def test_roles_come_from_the_records_not_the_names():
    renamed = [("oracle" if n == "route-sgd" and k == "private" else n, f, k, m, p, r)
               for n, f, k, m, p, r in METHODS if n != "oracle"]  # fmt: skip
    renamed.append(("route-sgd", "baseline", "private", 0.5, 1, 1.0))  # a "baseline" by its record
    best, cheapest, _ = best_and_cheapest(hand_made(renamed))
    assert (best["name"], best["family"]) == ("oracle", "routing")
    assert cheapest["name"] == "merge-sgd-global"


def test_the_best_itself_when_nothing_cheaper_is_close():
    res = hand_made([m for m in METHODS if m[0] != "merge-sgd-global"])
    best, cheapest, _ = best_and_cheapest(res)
    assert cheapest is best and best["name"] == "route-sgd"
    assert "the best itself" in headline(res)[1]


def test_fewer_than_two_common_tasks_fall_back_to_the_best_se():
    res = hand_made()
    route = next(m for m in res["methods"] if m["name"] == "merge-sgd-global")
    route["per_task"] = {TASKS[0]: route["per_task"][TASKS[0]]}  # one task in common
    best, cheapest, how = best_and_cheapest(res)
    assert cheapest is route and how["rule"] == "best se" and how["se"] == best["se"]
    assert how["diff"] == pytest.approx(route["mean"] - best["mean"])
    assert how["diff"] <= 2 * best["se"]
    assert "compared with the best's se" in headline(res)[1]
    route["mean"] = best["mean"] + 2.1 * best["se"]  # just outside 2 se of the best's loss
    assert best_and_cheapest(res)[1] is best


def test_no_fusion_method():
    res = hand_made([m for m in METHODS if m[1] == "baseline"])
    assert best_and_cheapest(res) == (None, None, {})
    assert headline(res) == [
        "No task-agnostic fusion method (ensembling, merging, routing) completed."
    ]


def test_the_report_opens_with_the_headline(tmp_path):
    res = hand_made()
    out = render(res, tmp_path)
    md, page = out["report.md"].read_text(), out["report.html"].read_text()
    assert md.splitlines()[2:5] == [f"- {line}" for line in headline(res)]
    assert md.index("Cheapest within 2 se") < md.index("## Figure 2")
    for line in headline(res):
        assert html.escape(line) in page
