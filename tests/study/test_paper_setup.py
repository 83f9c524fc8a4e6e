"""docs/paper/: the paper's setup (Phi-2, the imported mttl experts, flan-10k-flat) is the
`full` preset with the paper's library in place of the built-in benchmark."""

from __future__ import annotations

from pathlib import Path

from lorafuse.spec import load_spec
from lorafuse.study.config import load_config, preset_config

PAPER = Path(__file__).resolve().parents[2] / "docs" / "paper"


def test_the_paper_study_is_the_full_preset_on_the_paper_library():
    paper, full = load_config(PAPER / "study.yaml"), preset_config("full")
    assert paper.library_path() == PAPER / "spec.yaml"
    assert (paper.device, paper.dtype) == ("cuda", "bf16")
    same = ["examples", "fit_defaults", "analyses", "experts", "private_experts", "seed"]
    assert {k: getattr(paper, k) for k in same} == {k: getattr(full, k) for k in same}
    # every method of the preset but `shared` (the hub libraries hold no shared expert)
    shown = [(m.name, m.experts, m.options) for m in full.method_list() if m.name != "shared"]
    assert [(m.name, m.experts, m.options) for m in paper.method_list()] == shown


def test_the_paper_spec_names_phi2_its_data_and_both_kinds():
    spec = load_spec(PAPER / "spec.yaml")
    assert (spec.base_model, spec.data) == ("microsoft/phi-2", "sordonia/flan-10k-flat")
    assert set(spec.experts) == {"private", "mbc"}
