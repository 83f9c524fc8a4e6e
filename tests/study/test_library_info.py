"""What a study records of its library: the build's structure with every kind's off-task
ratio and training budget, from a hand-made manifest."""

from __future__ import annotations

import pytest

from lorafuse.study.library_info import build_structure


def _manifest(replay: float = 0.0) -> dict:
    experts = [{"name": t, "kind": "private", "tasks": [t]} for t in "abcd"]
    experts += [
        {"name": "shared", "kind": "shared", "tasks": list("abcd")},
        {"name": "cluster_0", "kind": "mbc", "tasks": ["a", "b", "c"]},
        {"name": "cluster_1", "kind": "mbc", "tasks": ["d"]},
    ]
    return {
        "settings": {
            "expert": {"steps": 10, "batch_size": 8, "replay": replay},
            "shared_steps": 20,
            "cluster_steps_per_task": True,
        },
        "experts": experts,
        "stages": {
            "structure": {"experts": 4, "kinds": {"private": {"ratio": 1.5}}},
            "offtask": {"kinds": {"mbc": {"ratio": 1.2}}},
        },
    }


def test_every_kind_has_its_ratio_and_budget():
    s = build_structure(_manifest(replay=0.25))
    assert s["kinds"] == {"private": {"ratio": 1.5}, "mbc": {"ratio": 1.2}}
    t = s["training"]
    own = 8 - 2  # a quarter of each 8-example batch is replay
    assert t["private"] == {"experts": 4, "steps": 10, "examples_per_task": 10 * own,
                            "replay": 0.25}  # fmt: skip
    # cluster experts: 10 steps per task of their cluster, so 60 own rows per task each
    assert t["mbc"]["steps"] == pytest.approx((30 + 10) / 2)
    assert t["mbc"]["examples_per_task"] == 10 * own
    assert t["shared"]["examples_per_task"] == pytest.approx(20 * own / 4)


def test_a_build_without_a_structure_stage_records_none():
    m = _manifest()
    del m["stages"]["structure"]
    assert build_structure(m) is None
