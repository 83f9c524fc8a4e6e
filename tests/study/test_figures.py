"""Figures of the study: valid PNGs from a realistic results dict, None without data."""

from __future__ import annotations

import copy

import pytest

from lorafuse.study.figures import cost_text, figure2, figure4, figure5, ordered, sparse_curve
from tests.study.helpers import is_png, realistic_results


@pytest.mark.parametrize("draw", [figure2, figure4, figure5, sparse_curve])
def test_figures_are_pngs(tmp_path, draw):
    out = draw(realistic_results(), tmp_path / f"{draw.__name__}.png")
    assert out == tmp_path / f"{draw.__name__}.png"
    assert is_png(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temp file left


@pytest.mark.parametrize("draw", [figure2, figure4, figure5, sparse_curve])
def test_figures_none_without_data(tmp_path, draw):
    empty = {"methods": [], "library": {}, "analyses": {}}
    assert draw(empty, tmp_path / "x.png") is None
    assert list(tmp_path.iterdir()) == []


def test_figures_none_when_their_methods_failed(tmp_path):
    res = realistic_results()
    for m in res["methods"]:
        if m["name"].startswith(("ensemble-uniform", "merge-uniform")) or m["experts"] == "mbc":
            m.update(status="failed", mean=None, se=None, per_task={})
        m["fit"] = None
    assert figure5(res, tmp_path / "f5.png") is None
    assert figure4(res, tmp_path / "f4.png") is None
    assert sparse_curve(res, tmp_path / "s.png") is None
    assert is_png(figure2(res, tmp_path / "f2.png"))  # failed rows are drawn as text


def test_figure5_draws_the_panel_it_has(tmp_path):
    res = realistic_results()
    res["methods"] = [m for m in res["methods"] if not m["name"].startswith("merge-uniform")]
    assert is_png(figure5(res, tmp_path / "f5.png"))


def test_ordered_groups_families_in_figure2_order():
    res = realistic_results()
    res["methods"].insert(0, copy.deepcopy(res["methods"][-2]))  # a routing method first
    fams = [m["family"] for m in ordered(res)]
    assert fams == sorted(fams, key=["baseline", "ensembling", "merging", "routing"].index)
    main_first = [m["experts"] for m in ordered(res) if m["family"] == "baseline"]
    assert main_first == sorted(main_first, key=lambda k: k != "mbc")  # Figure 2's kind first


def test_cost_text():
    assert cost_text({"cost": {"passes": 1, "relative_flops": 1.0042}}) == "1 pass, 1.004x FLOPs"
    assert cost_text({"cost": {"passes": 40, "relative_flops": 40.2}}) == "40 passes, 40.2x FLOPs"
    assert cost_text({}) == "cost n/a"
