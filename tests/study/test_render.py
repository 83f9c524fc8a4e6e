"""The report: report.md and report.html hold every method and claim, escape text, and are
written atomically; the console table lists every method."""

from __future__ import annotations

import html
import os

import pytest
from rich.console import Console

from lorafuse.study.claims import claims
from lorafuse.study.console import summary_table
from lorafuse.study.render import render
from tests.study.helpers import is_png, realistic_results

EVIL = "<script>alert('x')</script>"


def _no_temp_files(root) -> bool:
    return not [p for p in root.rglob("*") if ".tmp" in p.name]


def test_render_writes_figures_and_reports(tmp_path):
    res = realistic_results()
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "connectivity.png").write_bytes(
        (render(realistic_results(), tmp_path / "first")["figure4"]).read_bytes()
    )
    res["figures"] = {"connectivity": "figures/connectivity.png", "greedy": "figures/greedy.png"}
    out = render(res, tmp_path)
    assert set(out) == {"figure2", "figure4", "figure5", "sparse_curve", "report.md", "report.html"}
    for key in ("figure2", "figure4", "figure5", "sparse_curve"):
        assert out[key] == tmp_path / "figures" / f"{key}.png"
        assert is_png(out[key])
    md, page = out["report.md"].read_text(), out["report.html"].read_text()
    for m in res["methods"]:
        assert m["name"] in md and m["name"] in page
    for r in claims(res):
        assert r["claim"] in md
        assert html.escape(r["claim"]) in page
        assert html.escape(r["evidence"]) in page
    for text in (md, page):
        assert "figures/figure2.png" in text and "figures/connectivity.png" in text
        assert "Figure 3" in text  # the runner's figure gets its caption
        assert "greedy.png" in text and "not found" in text  # listed but missing
        assert "pico-llama" in text and "fit:ensemble-sgd" in text and "541.8" in text
        assert "does not hold" in text or "holds" in text
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "<table>" in page
    assert _no_temp_files(tmp_path)


def test_error_messages_are_escaped(tmp_path):
    res = realistic_results()
    failed = [m for m in res["methods"] if m["status"] == "failed"]
    assert failed and EVIL in failed[0]["error"]
    out = render(res, tmp_path)
    md, page = out["report.md"].read_text(), out["report.html"].read_text()
    assert "<script>" not in md and "<script>" not in page
    assert html.escape(failed[0]["error"]) in page
    assert "&lt;script>alert('x')&lt;/script> & out of memory" in md
    assert "route-sgd-arrow" in md and "failed" in md


def test_markdown_table_cells_escape_pipes_and_newlines(tmp_path):
    res = realistic_results()
    res["methods"][-1]["error"] = "bad | value\nsecond line"
    md = render(res, tmp_path)["report.md"].read_text()
    assert "bad \\| value second line" in md


def test_render_without_data(tmp_path):
    out = render({"methods": []}, tmp_path / "out")
    assert set(out) == {"report.md", "report.html"}
    md = out["report.md"].read_text()
    assert "not measured" in md and "lorafuse study" in md
    assert "both private experts: no Figure 4 comparison" in md
    assert not (tmp_path / "out" / "figures").exists()


def test_render_survives_runner_errors(tmp_path):
    res = realistic_results()
    res["library"]["experts"]["mbc"] = "error: no such folder <x>"
    res["analyses"]["greedy"] = {"error": "greedy <broke>"}
    res["analyses"]["not_best_on_own_task"] = None
    md = render(res, tmp_path)["report.md"].read_text()
    assert "mbc: error: no such folder &lt;x>" in md
    assert "greedy: failed: greedy &lt;broke>" in md


def test_failed_write_leaves_no_half_written_file(tmp_path, monkeypatch):
    real = os.replace

    def fail_on_html(src, dst):
        if str(dst).endswith("report.html"):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_html)
    with pytest.raises(OSError, match="disk full"):
        render(realistic_results(), tmp_path)
    assert not (tmp_path / "report.html").exists()
    assert _no_temp_files(tmp_path)


def test_rerender_replaces_reports(tmp_path):
    render(realistic_results(), tmp_path)
    res = realistic_results()
    res["config"]["name"] = "second"
    out = render(res, tmp_path)
    assert "lorafuse study: second" in out["report.md"].read_text()
    assert _no_temp_files(tmp_path)


def test_summary_table_lists_every_method():
    res = realistic_results()
    console = Console(record=True, width=200)
    console.print(summary_table(res))
    text = console.export_text()
    for m in res["methods"]:
        assert m["name"] in text
    assert "failed" in text and "did not complete" in text
    assert f"{res['methods'][0]['mean']:.4f} ± {res['methods'][0]['se']:.4f}" in text


def _with_fits(res):
    """realistic_results with three kinds of fit: converged, stopped by its cap, none."""
    for m in res["methods"]:
        if (m["name"], m["experts"]) == ("route-sgd", "mbc"):
            m["fit"] = {"steps": 40, "validation_loss": 0.912345, "converged": False,
                        "stop": "step cap", "final_validation_loss": 0.912345}  # fmt: skip
        if m["name"] == "merge-sgd-global":
            m["fit"] = {"steps": 17, "validation_loss": 1.5, "converged": True,
                        "stop": "plateau", "final_validation_loss": 1.51}  # fmt: skip
    return res


def _md_row(md: str, *first_cells: str) -> list[str]:
    prefix = "| " + " | ".join(first_cells) + " |"
    (line,) = [x for x in md.splitlines() if x.startswith(prefix)]
    return [c.strip() for c in line.strip("|").split("|")]


def test_figure2_table_shows_how_each_fit_ended(tmp_path):
    md = render(_with_fits(realistic_results()), tmp_path)["report.md"].read_text()
    head = _md_row(md, "method", "family", "experts")
    col = {h: i for i, h in enumerate(head)}
    assert {"steps", "val loss", "converged"} <= set(col)
    cells = _md_row(md, "route-sgd", "routing", "mbc")
    assert [cells[col[k]] for k in ("steps", "val loss", "converged")] == ["40", "0.9123", "no"]
    cells = _md_row(md, "merge-sgd-global", "merging", "mbc")
    assert [cells[col[k]] for k in ("steps", "val loss", "converged")] == ["17", "1.5000", "yes"]
    cells = _md_row(md, "base", "baseline", "mbc")  # no fit at all
    assert [cells[col[k]] for k in ("steps", "val loss", "converged")] == ["-", "-", "-"]
    cells = _md_row(md, "ensemble-minimax", "ensembling", "mbc")  # a fit, no convergence
    assert cells[col["converged"]] == "-"


def test_unconverged_fit_shows_in_claims_and_console(tmp_path):
    res = _with_fits(realistic_results())
    md = render(res, tmp_path)["report.md"].read_text()
    assert "inconclusive (not converged)" in md
    assert "route-sgd (step cap after 40 steps)" in md
    console = Console(record=True, width=220)
    console.print(summary_table(res))
    lines = console.export_text().splitlines()
    assert "converged" in next(x for x in lines if "method" in x and "status" in x)
    route = next(x for x in lines if "route-sgd " in x and "mbc" in x and "0.9" in x)
    merge = next(x for x in lines if "merge-sgd-global" in x)
    assert " no " in route and " yes " in merge


def test_report_states_the_library_structure(tmp_path):
    res = realistic_results()
    res["library"]["structure"] = {"experts": 32, "not_best_on_own_task": 7, "greedy_experts": 19}
    md = render(res, tmp_path)["report.md"].read_text()
    assert "7 of 32 private experts (22%) are not the best on their own task" in md
    assert "recovers the private oracle with 19 of 32 (59%)" in md
    res["library"]["structure"].update(
        max_examples_per_task=None,
        kinds={"private": {"ratio": 1.04}, "mbc": {"ratio": 0.93}},
        training={
            "private": {"experts": 32, "steps": 100, "examples_per_task": 800, "replay": 0.5},
            "shared": {"experts": 1, "steps": 300, "examples_per_task": 75, "replay": 0.5},
        },
    )
    md = render(res, tmp_path / "a")["report.md"].read_text()
    assert "off-task loss relative to the base model's: private 1.04, mbc 0.93" in md
    assert "full validation split" in md
    assert "private: 32 experts, 800 examples per task (100 steps each)" in md
    assert "shared: 1 expert, 75 examples per task (300 steps each)" in md
    assert "50% of each batch replays pretraining data" in md
    res["library"]["structure"] = None
    md = render(res, tmp_path / "b")["report.md"].read_text()
    assert "structure | not measured" in md


def test_methods_and_claims_beyond_the_paper_are_marked(tmp_path):
    from lorafuse.study.labels import beyond_note, marked_label

    res = realistic_results()
    md = render(res, tmp_path)["report.md"].read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("|")}
    assert "merging, beyond the paper (PEFT / mergekit)" in rows["merge-ties"]
    assert "merging, beyond the paper (LoraHub)" in rows["merge-search"]
    assert "beyond the paper" not in rows["merge-sgd-global"]
    for i in ("20", "21", "22"):
        assert "beyond the paper: " in rows[i]
    by_name = {m["name"]: m for m in res["methods"] if m["experts"] == "mbc"}
    assert marked_label(by_name["merge-ties"], "mbc") == "merge-ties \u2020"
    assert marked_label(by_name["merge-uniform"], "mbc") == "merge-uniform"
    assert beyond_note(res["methods"]) == "\u2020 beyond the paper: PEFT / mergekit, LoraHub"
    assert beyond_note([by_name["merge-uniform"]]) is None
