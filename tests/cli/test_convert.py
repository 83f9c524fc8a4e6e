"""`lorafuse import-mttl` through the CLI."""

from __future__ import annotations

from typer.testing import CliRunner

from lorafuse.cli import app
from lorafuse.library import ExpertLibrary
from tests.formats.helpers import EXPERTS, write_mttl_expert

runner = CliRunner()


def test_import_mttl_writes_a_library_and_refuses_to_overwrite(llama_dir, tmp_path):
    src, out = tmp_path / "mttl", tmp_path / "experts"
    src.mkdir()
    for i, name in enumerate(EXPERTS):
        write_mttl_expert(src, llama_dir, name, seed=i)
    res = runner.invoke(app, ["import-mttl", str(src), "--out", str(out), "--seed", "0"])
    assert res.exit_code == 0, res.output
    assert "2 mttl experts" in res.output and "task_b,task_c" in res.output
    assert ExpertLibrary.load([out]).names == ["cluster_0", "task_a"]
    res = runner.invoke(app, ["import-mttl", str(src), "--out", str(out)])
    assert res.exit_code == 2 and "exists already" in " ".join(res.output.split())
    res = runner.invoke(app, ["import-mttl", str(src), "--out", str(tmp_path / "o"),
                              "--experts", "task_z"])  # fmt: skip
    assert res.exit_code == 2 and "no mttl expert named task_z" in " ".join(res.output.split())
    assert not (tmp_path / "o").exists()
