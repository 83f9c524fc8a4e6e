"""The method table: explicit, typed, and the options it declares are the ones enforced."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from lorafuse.errors import LorafuseError
from lorafuse.fit.options import Options
from lorafuse.methods.method import ROLES, Cost
from lorafuse.methods.registry import BY_NAME, METHODS, resolve


def test_every_row_declares_role_options_and_cost():
    assert len({m.name for m in METHODS}) == len(METHODS) == len(BY_NAME)
    for m in METHODS:
        assert m.role in ROLES and m.description, m.name
        assert issubclass(m.options, Options) and isinstance(m.cost, Cost), m.name
        assert m.options.model_config["extra"] == "forbid", m.name
        for name, field in m.options.model_fields.items():
            assert field.description, (m.name, name)  # a one-line doc for `lorafuse methods`
        m.options()  # every option has a default
        if m.fitted_by is not None:  # a top-k variant passes its options to its fit
            parent = BY_NAME[m.fitted_by]
            assert parent.fit is not None and m.fit is None and m.options is parent.options
    assert {m.role for m in METHODS} == set(ROLES)


def test_an_unknown_or_mistyped_option_is_an_error_naming_the_allowed_ones():
    method, _ = resolve("route-sgd")
    with pytest.raises(LorafuseError) as e:
        method.parse_options({"max_step": 10})
    assert "method route-sgd has no option 'max_step'" in str(e.value)
    assert "max_steps" in str(e.value).split("allowed options:")[1]
    with pytest.raises(LorafuseError, match="option 'patience'"):
        method.parse_options({"patience": "soon"})
    with pytest.raises(LorafuseError, match="base has no option 'lr'.*it has no options"):
        resolve("base")[0].parse_options({"lr": 0.1})
    with pytest.raises(ValidationError):
        BY_NAME["ensemble-exact"].options(lr_grid=[0.1])  # exact learns no rate


def test_defaults_the_presets_rely_on():
    # Every SGD fit, distillation included, defaults to the paper's protocol (Appendix A:
    # 5 epochs, the grid {1e-3, 1e-4, 1e-5}), batch 16, seed 0, the task-balanced
    # objective; the student is rank 4, alpha 16, distils ensemble-sgd; fused fits and the
    # student validate on 32 examples per task.
    d = BY_NAME["ensemble-distill"].options()
    assert (d.rank, d.alpha, d.validation_max_per_task, d.teacher) == (4, 16, 32, "ensemble-sgd")
    assert BY_NAME["ensemble-distill"].declares("lr_grid")  # fit_defaults' grid reaches it
    for name in ("ensemble-sgd", "ensemble-distill", "merge-sgd-global", "route-sgd", "route-hc"):
        o = BY_NAME[name].options()
        assert (o.epochs, o.batch_size, o.seed, o.grid()) == (5, 16, 0, [1e-3, 1e-4, 1e-5])
        assert o.objective == "task"
    assert BY_NAME["ensemble-sgd"].options().validation_max_per_task is None  # = fit cap
    assert BY_NAME["route-sgd"].options().validation_max_per_task == 32


def test_importing_the_package_registers_nothing():
    code = (
        "import sys, lorafuse.methods\n"
        "print([m for m in sys.modules if m.startswith('lorafuse.methods.')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_resolve():
    assert resolve("ensemble-sparse:4") == (BY_NAME["ensemble-sparse"], "4")
    assert resolve("arrow") == (BY_NAME["arrow"], None)
    with pytest.raises(LorafuseError, match="takes no argument"):
        resolve("arrow:3")
