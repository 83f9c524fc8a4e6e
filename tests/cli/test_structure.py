"""`lorafuse cluster` and `lorafuse connect` through the CLI."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lorafuse.cli import app

runner = CliRunner()


def test_cluster_writes_clusters_and_heat_map(mini_bench, tmp_path):
    out = tmp_path / "clusters.json"
    res = runner.invoke(
        app, ["cluster", "--library", str(mini_bench), "--k", "2", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    members = sorted(e for c in data["clusters"] for e in c["experts"])
    assert members == ["count", "reverse", "upper"] and len(data["clusters"]) == 2
    assert out.with_suffix(".png").stat().st_size > 1000
    res = runner.invoke(
        app, ["cluster", "--library", str(mini_bench), "--k", "4", "--out", str(out)]
    )
    assert res.exit_code == 2 and "k=4 clusters is impossible" in res.output
    assert "1..3" in res.output
    res = runner.invoke(
        app, ["cluster", "--library", str(mini_bench), "--k", "0", "--out", str(out)]
    )
    assert res.exit_code == 2 and "--k" in res.output and "0 is not a count >= 1" in res.output


def test_connect_writes_curves(mini_bench, tmp_path):
    out = tmp_path / "conn"
    args = ["connect", "--library", str(mini_bench), "--pair", "count,upper", "--alphas", "3"]
    res = runner.invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    curves = json.loads((out / "connectivity.json").read_text())["curves"]
    assert curves[0]["alphas"] == [0.0, 0.5, 1.0]
    assert (out / "connectivity.png").exists()
    res = runner.invoke(app, [*args[:4], "count,nobody", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "nobody" in res.output and not (tmp_path / "x").exists()
    res = runner.invoke(app, [*args[:4], "count", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "two different private experts" in res.output
