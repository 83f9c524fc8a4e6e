"""Study configs: validation names the bad key and its line; presets load."""

from __future__ import annotations

import pytest

from lorafuse.errors import LorafuseError
from lorafuse.study.config import PRESETS, load_config, preset_config

GOOD = """\
name: mine
library: bench
examples: {fit: 4, test: 2}
fit_defaults: {max_steps: 3}
methods:
  - base
  - {name: route-sgd, options: {max_steps: 5}}
  - {name: oracle, experts: mbc}
"""


def write(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_a_valid_config(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.library_path() == tmp_path / "bench"
    methods = cfg.method_list()
    assert [(m.name, m.experts) for m in methods] == [
        ("base", "private"), ("route-sgd", "private"), ("oracle", "mbc"),
    ]  # fmt: skip
    assert methods[1].options == {"max_steps": 5}
    assert methods[0].options == {}  # base declares no max_steps: the default skips it
    assert cfg.examples.fit == 4 and cfg.examples.validation is None


@pytest.mark.parametrize(
    "text, needle",
    [
        (GOOD + "budget: 3\n", "unknown key 'budget' (line 9)"),
        (GOOD.replace("{name: oracle, experts: mbc}", "{name: oracle, expert: mbc}"),
         "unknown key 'methods.2.expert' (line 8)"),
        (GOOD.replace("fit: 4", "fit: -1"), "examples.fit' (line 3)"),
        (GOOD.replace("- base", "- basse"), "methods.0 (line 6): unknown method 'basse'"),
        ("methods: [base]\n", "needs `library:`"),
        ("name: x\n", "missing required key 'methods'"),
        ("[1, 2]\n", "must be a mapping"),
    ],
)  # fmt: skip
def test_bad_configs_name_the_key_and_line(tmp_path, text, needle):
    with pytest.raises(LorafuseError) as e:
        load_config(write(tmp_path, text)).library_path()
    assert needle in str(e.value)
    assert "study.yaml" in str(e.value) or "library" in str(e.value)


def test_an_unknown_method_option_names_method_key_line_and_allowed_keys(tmp_path):
    from lorafuse.methods.registry import resolve

    text = GOOD.replace("options: {max_steps: 5}", "options: {max_step: 10}")
    with pytest.raises(LorafuseError) as e:
        load_config(write(tmp_path, text))
    msg = str(e.value)
    assert "methods.1.options.max_step (line 7)" in msg
    assert "method route-sgd has no option 'max_step'" in msg
    allowed = resolve("route-sgd")[0].option_names()
    assert "max_steps" in allowed and f"allowed options: {', '.join(allowed)}" in msg


def test_a_mistyped_option_or_default_names_its_line(tmp_path):
    text = GOOD.replace("options: {max_steps: 5}", "options: {patience: soon}")
    with pytest.raises(LorafuseError, match=r"methods.1.options.patience \(line 7\).*route-sgd"):
        load_config(write(tmp_path, text))
    text = GOOD.replace("fit_defaults: {max_steps: 3}", "fit_defaults: {max_steps: many}")
    with pytest.raises(LorafuseError, match=r"fit_defaults.max_steps \(line 4\)"):
        load_config(write(tmp_path, text))
    text = GOOD.replace("fit_defaults: {max_steps: 3}", "fit_defaults: {max_step: 3}")
    with pytest.raises(LorafuseError, match=r"fit_defaults.max_step \(line 4\): no method"):
        load_config(write(tmp_path, text))


def test_fit_defaults_reach_only_the_methods_that_declare_them(tmp_path):
    from lorafuse.methods.registry import resolve

    defaults = {"lr_grid": [0.01], "max_steps": 3, "clusters": 2}
    text = (
        f"library: bench\nfit_defaults: {defaults}\n"
        "methods: [base, ensemble-exact, ensemble-sgd, ensemble-distill, route-sgd, route-hc]\n"
    )
    methods = load_config(write(tmp_path, text)).method_list()
    for m in methods:
        method, _ = resolve(m.name)
        assert m.options == {k: v for k, v in defaults.items() if k in method.option_names()}
    assert [m.options for m in methods[:2]] == [{}, {}]
    assert methods[3].options == {"lr_grid": [0.01], "max_steps": 3}  # the student's grid too
    assert methods[5].options == defaults


def test_a_student_without_its_teacher_in_the_study_is_an_error(tmp_path):
    text = "library: bench\nmethods:\n  - base\n  - ensemble-distill\n"
    want = r"methods.1 \(line 4\): ensemble-distill over the private experts reads the fit "
    with pytest.raises(LorafuseError, match=want + "of ensemble-sgd: list ensemble-sgd"):
        load_config(write(tmp_path, text))
    other = "  - {name: ensemble-sgd, experts: mbc}\n"  # over other experts: not its teacher
    with pytest.raises(LorafuseError, match="reads the fit of ensemble-sgd"):
        load_config(write(tmp_path, text + other))
    load_config(write(tmp_path, text + "  - ensemble-sgd\n"))  # listed after: fitted first
    uniform = "  - {name: ensemble-distill, options: {teacher: ensemble-uniform}}\n"
    load_config(write(tmp_path, "library: bench\nmethods:\n" + uniform))  # reads no fit


def test_unknown_nested_key_lists_the_known_ones(tmp_path):
    with pytest.raises(LorafuseError, match="known keys: .*max_pairs"):
        load_config(write(tmp_path, GOOD + "analyses: {connectivity: {pair: auto}}\n"))


def test_every_preset_loads_and_names_known_methods():
    from lorafuse.methods.registry import resolve

    for preset in PRESETS:
        cfg = preset_config(preset)
        assert cfg.build is not None and cfg.build.preset == preset
        for m in cfg.method_list():
            resolve(m.name)
    with pytest.raises(LorafuseError, match="unknown study preset"):
        preset_config("huge")


def test_every_preset_fits_until_a_plateau_within_a_cap():
    from lorafuse.fit.sgd import budget
    from lorafuse.methods.registry import resolve

    for preset in PRESETS:
        cfg = preset_config(preset)
        for m in cfg.method_list():
            method, _ = resolve(m.name)
            if method.fit is None or "lr_grid" not in m.options:
                continue  # nothing learned by SGD here
            s = method.parse_options(m.options).settings(0.01)  # valid (raises otherwise)
            assert s.patience is not None, (preset, m.name)  # stops on a plateau
            assert s.epochs is not None or s.max_steps is not None  # within a cap
            total, _ = budget(s, steps_per_epoch=1000)
            assert total > (s.eval_every or 1000) * s.patience, (preset, m.name)


def _sgd_protocols(preset: str) -> dict[str, tuple]:
    """Each SGD fit of a preset (every method whose options carry an lr grid) and the
    rule it resolves to: lr grid, epochs, step cap, validation spacing, patience,
    min_delta, batch, warm-up, objective."""
    from lorafuse.fit.options import GridOptions
    from lorafuse.methods.registry import resolve

    out = {}
    for m in preset_config(preset).method_list():
        method, _ = resolve(m.name)
        if method.fit is None or not issubclass(method.options, GridOptions):
            continue
        o = method.parse_options(m.options)
        out[f"{m.name}@{m.experts}"] = (
            tuple(o.grid()), o.epochs, o.max_steps, o.eval_every, o.patience, o.min_delta,
            o.batch_size, o.grad_accum, o.warmup, o.objective,
        )  # fmt: skip
    return out


def test_every_sgd_fit_of_a_preset_has_the_same_lr_grid_and_budget():
    for preset in ("micro", "tiny", "small", "full"):
        rules = _sgd_protocols(preset)
        fits = {k.split("@")[0] for k in rules}
        assert fits >= {"ensemble-sgd", "ensemble-distill", "merge-sgd-global",
                        "merge-sgd-layer", "route-sgd", "route-hc"}, preset  # fmt: skip
        assert len(set(rules.values())) == 1, (preset, rules)
    (small,) = set(_sgd_protocols("small").values())
    assert small[:3] == ((0.1, 0.01, 0.001), None, 800) and small[-1] == "task"
    (full,) = set(_sgd_protocols("full").values())  # the paper's (Appendix A, Section 3.2.1)
    assert full[:2] == ((1e-3, 1e-4, 1e-5), 5) and full[-1] == "token"
    for preset in ("micro", "tiny"):  # test presets stay cheap: one rate
        (rule,) = set(_sgd_protocols(preset).values())
        assert len(rule[0]) == 1 and rule[-1] == "task"


def test_the_objective_reaches_every_sgd_fits_options_so_its_stage_key(tmp_path):
    # The study's fit stage key hashes a method's options (runner `_Context.fit`): a
    # changed objective in fit_defaults changes every SGD fit's options, hence its key.
    text = "library: bench\nfit_defaults: {objective: token}\nmethods: [base, ensemble-sgd, "
    text += "ensemble-distill, merge-sgd-layer, route-sgd]\n"
    methods = load_config(write(tmp_path, text)).method_list()
    assert [m.options.get("objective") for m in methods] == [None] + ["token"] * 4
    with pytest.raises(LorafuseError, match=r"fit_defaults.objective.*'task' or 'token'"):
        load_config(write(tmp_path, text.replace("objective: token", "objective: tokens")))


def test_a_binary_config_names_the_file(tmp_path):
    f = tmp_path / "study.yaml"
    f.write_bytes(b"\x80\x81 not text")
    with pytest.raises(LorafuseError, match=r"study config: .*study.yaml is not UTF-8 text"):
        load_config(f)
