"""The README's Python blocks run, on a pico model and random experts, as a user would."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import LLAMA_TARGETS, make_adapter, make_llama

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = "<!-- not run by tests/test_readme.py:"  # followed by the reason, on the line above


def python_blocks() -> list[tuple[int, str, str | None]]:
    """(line, code, reason to skip or None) for every ```python block of the README."""
    text = README.read_text()
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = before[len(SKIP) :].strip(" ->") if before.startswith(SKIP) else None
        out.append((line, m.group(1), reason))
    return out


def test_every_skipped_block_says_why():
    blocks = python_blocks()
    assert blocks, "the README has no Python block"
    assert any(reason is None for _, _, reason in blocks)
    for line, _, reason in blocks:
        assert reason is None or len(reason) > 10, f"README line {line}: skipped without a reason"


@pytest.mark.parametrize(
    "line,code", [(line, code) for line, code, reason in python_blocks() if reason is None]
)
def test_readme_python_block_runs(line, code, tmp_path, monkeypatch):
    base = make_llama(tmp_path / "base")
    for i, name in enumerate(["task_a", "task_b", "task_c"]):
        make_adapter(base, tmp_path / "experts" / name, 300 + i, LLAMA_TARGETS, r=4, lora_alpha=8)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme"})
    if "save_adapter(" in code:  # what the block says it writes is there
        assert (tmp_path / "merged" / "adapter_config.json").is_file()
    if "save_merged_model(" in code:
        assert (tmp_path / "merged-model" / "config.json").is_file()
