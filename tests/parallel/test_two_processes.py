"""Two CPU processes (gloo, `accelerate launch`) give a one-process run's numbers.

tests/parallel/script.py evaluates (loss and answers), builds an expert x task matrix
(and reads it back from its cache), fits ensemble-sgd and runs the `micro` study twice
(the second time from its stage cache). It runs once as one process and once under
`accelerate launch --multi_gpu --num_processes 2` (on a machine without GPUs that is two
CPU processes over gloo; `--cpu` would start one), and every number must agree.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorafuse.study.config import preset_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests/parallel/script.py"
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(mini_bench, tmp_path_factory):
    """(one-process output, two-process output) folders of the script."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate launcher not installed")
    root = tmp_path_factory.mktemp("parallel")
    cfg = preset_config("micro")
    cfg = cfg.model_copy(update={"build": cfg.build.model_copy(update={"out": str(root / "lib")})})
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "TRANSFORMERS_VERBOSITY": "error"}  # fmt: skip
    one, two = root / "one", root / "two"
    args = [str(SCRIPT), str(mini_bench), str(config)]
    one.mkdir()  # the one-process run also builds the micro library
    out = subprocess.run([sys.executable, *args, str(one)], env=env, cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    two.mkdir()
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(_free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", *args, str(two)]  # fmt: skip
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return one, two


def _got(folder: Path) -> dict:
    return json.loads((folder / "got.json").read_text())


def _close(a, b, where: str = "") -> None:
    """Equal structures; floats within TOL (absolute, or relative past 1)."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            _close(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=TOL, rel=TOL), where
    else:
        assert a == b, where


def test_the_processes_split_the_work(runs):
    _, two = runs
    # both processes ran (each wrote its list of writes) and met at the collectives
    assert (two / "writes-0.json").is_file() and (two / "writes-1.json").is_file()


@pytest.mark.parametrize("stage", ["eval oracle", "eval ensemble-uniform", "answers"])
def test_evaluation_and_answers_equal_one_process(runs, stage):
    one, two = (_got(r) for r in runs)
    _close(one[stage], two[stage], stage)


def test_the_matrix_equals_one_process_and_its_cache(runs):
    one, two = (_got(r) for r in runs)
    _close(one["matrix"], two["matrix"], "matrix")
    assert two["matrix again"] == two["matrix"]  # read back from the chunks saved once


def test_a_fit_equals_one_process(runs):
    one, two = (_got(r) for r in runs)
    _close(one["fit"], two["fit"], "weights")
    _close(one["eval fit"], two["eval fit"], "evaluation of the fit")


def test_the_micro_study_equals_one_process_and_resumes(runs):
    one, two = (_got(r) for r in runs)
    assert set(two["status"].values()) == {"ok"} and two["status"] == one["status"]
    _close(one["study"], two["study"], "study")
    _close(one["analyses"], two["analyses"], "analyses")
    assert all(two["resumed"].values()), two["resumed"]  # every stage from the cache
    assert two["study again"] == two["study"]
    for name in ("results.json", "report.md", "report.html"):
        assert (runs[1] / "study" / name).is_file()


def test_only_the_main_process_writes(runs):
    _, two = runs
    main = json.loads((two / "writes-0.json").read_text())
    other = json.loads((two / "writes-1.json").read_text())
    assert other == []
    written = {Path(p).name for p in main}
    assert "ensemble-sgd__private.json" in written
    assert {"results.json", "report.md"} <= written
    # the SGD fits' checkpoints: written and removed by the main process alone (another
    # process removing their folder while the main one saved failed the fit there)
    assert any(n.endswith(".pt") and Path(p).parent.name == ".ckpt" for p in main
               for n in [Path(p).name])  # fmt: skip
    assert any(n.startswith("chunk_") for n in written)  # the matrix's cached chunks


def test_the_cli_under_accelerate_launch(mini_bench, tmp_path):
    # `accelerate launch -m lorafuse eval`: the result file and the table come once and
    # hold the one-process numbers.
    from lorafuse.methods.run import evaluate_method
    from lorafuse.spec import load_spec
    from lorafuse.workspace import Workspace

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate launcher not installed")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "oracle.json"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(_free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "lorafuse", "eval", "--library", str(mini_bench),
           "--method", "oracle", "--split", "validation", "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # one table and one log of progress, from the main process
    assert run.stdout.count("| oracle |") == 1 and run.stdout.count("start oracle\n") == 1
    got = json.loads(out.read_text())
    want = evaluate_method(Workspace(load_spec(mini_bench)), "oracle", "validation")
    _close(want.per_task, got["per_task"], "per_task")
    assert list(tmp_path.iterdir()) == [out]
