"""Bad input never wins (issue 16), class by class: each class's example and its siblings.

Every case asserts the exit code (2 for a user's mistake, 1 for an internal error), the
offending value named, no traceback, and the file system unchanged apart from what the
command promises.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorafuse.cli import app

runner = CliRunner()


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with its content hash (folders: 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = (
            "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        )
    return out


def refused(res, *named: str, code: int = 2) -> str:
    """Assert a clean refusal: exit `code`, every `named` text shown, no traceback."""
    shown = " ".join(res.output.split())
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    for text in named:
        assert text in shown, (text, shown)
    return shown


@pytest.fixture
def lib(llama_experts, tmp_path) -> Path:
    """A folder of four experts the test may write around."""
    root = tmp_path / "lib"
    root.mkdir()
    for e in llama_experts:
        shutil.copytree(e, root / e.name)
    return root


# ---- class 1: an output never overlaps its inputs ------------------------------------------
def test_merge_into_its_own_library_is_refused(lib):
    before = snapshot(lib)
    for out, extra in (
        (lib / "merged", []),
        (lib / "merged", ["--force"]),
        (lib / "e0", ["--force"]),  # over a trained expert
        (lib, ["--force"]),  # over the whole library
        (lib.parent, ["--force"]),  # around it
    ):
        res = runner.invoke(app, ["merge", str(lib), "--out", str(out), *extra])
        refused(res, "--out", "EXPERTS", "choose an output outside them")
        assert snapshot(lib) == before
    argv = ["merge", str(lib / "e0"), str(lib / "e1"), "--out", str(lib / "e1"), "--force"]
    res = runner.invoke(app, argv)
    refused(res, "--out", str((lib / "e1").resolve()))


def test_merge_model_out_inside_the_base_or_the_adapter_is_refused(lib, llama_dir, tmp_path):
    before = snapshot(llama_dir)
    out = tmp_path / "m"
    for model_out in (llama_dir / "merged", out / "full"):
        args = ["merge", str(lib), "--out", str(out), "--base", str(llama_dir)]
        res = runner.invoke(app, [*args, "--model-out", str(model_out)])
        refused(res, "--model-out")
    assert snapshot(llama_dir) == before and not out.exists()


def test_other_commands_refuse_outputs_over_their_inputs(mini_bench, tmp_path):
    before = snapshot(mini_bench)
    experts = mini_bench / "experts" / "private"
    lib = ["--library", str(mini_bench)]
    cases = [
        ["eval", *lib, "--method", "base", "--out", str(experts / "r.json")],
        ["matrix", *lib, "--out", str(experts / "count" / "m.json")],
        ["matrix", *lib, "--out", str(tmp_path / "m.json"), "--cache", str(mini_bench / "base")],
        ["cluster", *lib, "--out", str(experts / "c.json")],
        ["connect", *lib, "--pair", "count,upper", "--out", str(mini_bench / "data"), "--force"],
    ]
    for argv in cases:
        refused(runner.invoke(app, argv), "choose an output outside them")
    assert snapshot(mini_bench) == before
    matrix = tmp_path / "m.json"
    matrix.write_text("{}")
    res = runner.invoke(app, ["refactor", str(matrix), "--out", str(tmp_path), "--force"])
    refused(res, "MATRIX")
    assert matrix.read_text() == "{}"


def test_import_mttl_and_compare_refuse_outputs_inside_their_inputs(tmp_path):
    src = tmp_path / "mttl"
    src.mkdir()
    (src / "a.meta").write_text("{}")
    res = runner.invoke(app, ["import-mttl", str(src), "--out", str(src / "peft")])
    refused(res, "SOURCE")
    study = tmp_path / "study"
    study.mkdir()
    (study / "results.json").write_text("{}")
    res = runner.invoke(app, ["compare", str(study), str(study), "--out", str(study)])
    refused(res, "STUDIES")
    assert sorted(p.name for p in study.iterdir()) == ["results.json"]


def test_library_scan_skips_hidden_and_temporary_folders(lib):
    from lorafuse.library import ExpertLibrary

    shutil.copytree(lib / "e0", lib / ".merged.tmp-host-1-abc")  # a killed writer's leftover
    assert ExpertLibrary.load([lib]).names == ["e0", "e1", "e2", "e3"]


# ---- class 3: everything is checked before anything is written -----------------------------
def test_merge_with_a_missing_base_writes_nothing(lib, tmp_path):
    out, full = tmp_path / "adapter", tmp_path / "full"
    args = ["merge", str(lib), "--out", str(out), "--model-out", str(full)]
    res = runner.invoke(app, [*args, "--base", str(tmp_path / "missing")])
    refused(res, "--base", "missing", "config.json")
    assert not out.exists() and not full.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["lib"]


def test_merge_with_a_base_of_other_shapes_writes_nothing(lib, gpt2_dir, tmp_path):
    out, full = tmp_path / "adapter", tmp_path / "full"
    args = ["merge", str(lib), "--out", str(out), "--model-out", str(full)]
    refused(runner.invoke(app, [*args, "--base", str(gpt2_dir)]))
    assert not out.exists() and not full.exists()


def test_study_and_build_check_before_creating_their_folders(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("library: nowhere\nmethods: [merge-uniform]\n")
    out = tmp_path / "study"
    refused(runner.invoke(app, ["study", "--config", str(config), "--out", str(out)]), "nowhere")
    assert not out.exists()
    res = runner.invoke(app, ["study", "--preset", "micro", "--out", str(out), "--dtype", "fp8"])
    refused(res, "fp8")
    assert not out.exists()
    build = tmp_path / "b"
    res = runner.invoke(app, ["benchmark", "build", "--out", str(build), "--threads", "0"])
    refused(res, "--threads")
    assert not build.exists()
    res = runner.invoke(app, ["benchmark", "build", "--out", str(build), "--preset", "nope"])
    refused(res, "nope")
    assert not build.exists()


def test_eval_checks_every_method_before_running_any(mini_bench, tmp_path):
    out = tmp_path / "results"
    argv = ["eval", "--library", str(mini_bench), "--method", "base", "--method", "nonsense"]
    refused(runner.invoke(app, [*argv, "--out", str(out)]), "nonsense")
    argv = ["eval", "--library", str(mini_bench), "--method", "base", "--experts", "nokind"]
    refused(runner.invoke(app, [*argv, "--out", str(out)]), "nokind")
    assert not out.exists()


# ---- class 4: user text is printed literally ------------------------------------------------
@pytest.mark.parametrize("name", ["a[/]b", "x[draft]", "[bold red]y"])
def test_paths_with_markup_are_printed_as_they_are(tmp_path, name):
    res = runner.invoke(app, ["info", str(tmp_path / name)])
    refused(res, name)
    res = runner.invoke(app, ["merge", str(tmp_path / name), "--out", str(tmp_path / "o")])
    refused(res, name)


def test_non_finite_weights_are_shown(lib, tmp_path):
    res = runner.invoke(
        app, ["merge", str(lib), "--out", str(tmp_path / "o"), "--weights", "nan,1,1,1"]
    )
    refused(res, "--weights", "nan")
    res = runner.invoke(
        app, ["merge", str(lib), "--out", str(tmp_path / "o"), "--weights", "1,inf,1,1"]
    )
    refused(res, "inf")
    assert not (tmp_path / "o").exists()


# ---- class 5: numeric options (see also test_bad_options.py) --------------------------------
@pytest.mark.parametrize("value", ["-1", "0"])
def test_eval_example_cap_must_be_positive(mini_bench, value):
    argv = ["eval", "--library", str(mini_bench), "--method", "base"]
    refused(runner.invoke(app, [*argv, "--max-examples-per-task", value]), value, "a count >= 1")


def test_a_device_this_machine_lacks_is_a_clear_error(mini_bench):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["eval", "--library", str(mini_bench), "--method", "base", "--device", "cuda:3"]
    refused(runner.invoke(app, argv), "cuda:3", "no CUDA GPU")


# ---- class 6: OS errors and internal errors -------------------------------------------------
def test_output_under_a_file_or_a_folder_for_a_file(lib, mini_bench, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = runner.invoke(app, ["merge", str(lib), "--out", str(blocker / "sub" / "out")])
    refused(res, str(blocker), "is a file, not a folder")
    folder = tmp_path / "folder"
    folder.mkdir()
    res = runner.invoke(app, ["matrix", "--library", str(mini_bench), "--out", str(folder)])
    refused(res, str(folder), "is a folder")
    res = runner.invoke(app, ["merge", str(lib), "--out", str(blocker), "--force"])
    refused(res, str(blocker), "is a file")
    assert blocker.read_text() == "x"


def test_read_only_output_folder(lib, tmp_path):
    if os.geteuid() == 0:  # root ignores folder permissions; /sys refuses even root
        ro, out = Path("/sys"), Path("/sys/lorafuse-merged")
        if not ro.is_dir():
            pytest.skip("no read-only folder to try as root")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "merged"
    try:
        res = runner.invoke(app, ["merge", str(lib), "--out", str(out)])
        refused(res, "not permitted" if os.geteuid() == 0 else "Permission denied", str(ro))
    finally:
        if ro != Path("/sys"):
            ro.chmod(0o700)
    assert not out.exists()


def test_internal_errors_are_one_line_and_debug_shows_the_traceback(lib, tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module("lorafuse.merge")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(module, "merge", broken)
    argv = ["merge", str(lib), "--out", str(tmp_path / "o")]
    refused(runner.invoke(app, argv), "internal error", "a bug", "--debug", code=1)
    res = runner.invoke(app, ["--debug", *argv])
    assert res.exit_code == 1 and isinstance(res.exception, RuntimeError)
    from lorafuse.cli.common import DEBUG

    DEBUG["on"] = False


def test_unreadable_files_are_named(mini_bench, tmp_path):
    matrix = tmp_path / "m.json"
    matrix.write_text('{"experts": ')
    refused(runner.invoke(app, ["refactor", str(matrix), "--out", str(tmp_path / "r")]), "m.json")
    assert not (tmp_path / "r").exists()


# ---- class 7: killed runs leave no litter ---------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_folders_of_the_same_output_are_removed(lib, tmp_path):
    host = socket.gethostname()
    stale = tmp_path / f".merged.tmp-{host}-{_dead_pid()}-abcd1234"
    live = tmp_path / f".merged.tmp-{host}-{os.getpid()}-efgh5678"  # a running writer's
    other = tmp_path / f".other.tmp-{host}-{_dead_pid()}-ijkl9012"  # another output's
    foreign = tmp_path / ".merged.tmp-otherhost-1-mnop3456"  # another machine's
    for d in (stale, live, other, foreign):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"0" * 1000)
    res = runner.invoke(app, ["merge", str(lib), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    assert not stale.exists() and live.exists() and other.exists() and foreign.exists()


def test_a_killed_merge_leaves_only_what_the_next_run_removes(lib, tmp_path):
    out = tmp_path / "merged"
    code = (
        "import os, sys\n"
        "import lorafuse.merge as m\n"
        "real = m.save_file if hasattr(m, 'save_file') else None\n"
        "import safetensors.torch as st\n"
        "def die(*a, **k):\n"
        "    os._exit(9)\n"
        "st.save_file = die\n"
        "from lorafuse.cli import main\n"
        f"sys.argv = ['lorafuse', 'merge', {str(lib)!r}, '--out', {str(out)!r}]\n"
        "main()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=False)
    litter = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.tmp-")]
    assert litter and not out.exists()  # killed mid-write: a temp folder, no output
    res = runner.invoke(app, ["merge", str(lib), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert not any(p.name.startswith(".merged.") for p in tmp_path.iterdir())


# ---- class 8: surprises are said ------------------------------------------------------------
def test_merge_warns_and_refuses_what_a_user_would_want_to_hear(lib, tmp_path):
    res = runner.invoke(
        app, ["merge", str(lib), "--out", str(tmp_path / "a"), "--weights", "1,1,1,1"]
    )
    assert res.exit_code == 0 and "warning:" in res.output and "sum to 4" in res.output
    res = runner.invoke(
        app, ["merge", str(lib), "--out", str(tmp_path / "b"), "--weights", "0,0,0,0"]
    )
    refused(res, "all zero")
    assert not (tmp_path / "b").exists()
    argv = ["merge", str(lib), "--out", str(tmp_path / "c"), "--space", "deltas", "--rank", "99"]
    res = runner.invoke(app, argv)
    shown = " ".join(res.output.split())
    assert res.exit_code == 0 and "--rank 99" in shown and "exported exactly" in shown
    meta = json.loads((tmp_path / "c" / "lorafuse_expert.json").read_text())
    assert meta["rank"] == 99
    res = runner.invoke(
        app, ["merge", str(lib), "--out", str(tmp_path / "d"), "--weights", ".25,.25,.25,.25"]
    )
    assert res.exit_code == 0 and "warning" not in res.output


def test_method_arguments_with_markup_are_printed_as_they_are(mini_bench):
    argv = ["fit", "--library", str(mini_bench), "--method", "single:[/]x"]
    refused(runner.invoke(app, argv), "single has nothing to fit")
    argv = ["eval", "--library", str(mini_bench), "--method", "single:[bold]x"]
    refused(runner.invoke(app, argv), "[bold]x")
