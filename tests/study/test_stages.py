"""The stage cache: a changed input reruns a stage, an unchanged one is reused."""

from __future__ import annotations

from lorafuse.study.stages import StageCache, stage_key


def test_keys_are_stable_and_input_sensitive():
    assert stage_key("a", {"x": 1, "y": [2]}) == stage_key("a", {"y": [2], "x": 1})
    assert stage_key("a", {"x": 1}) != stage_key("a", {"x": 2})


def test_run_reuses_and_recomputes(tmp_path):
    cache = StageCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"v": len(calls)}

    assert cache.run("fit:m@private", "k1", compute) == {"v": 1}
    assert StageCache(tmp_path).run("fit:m@private", "k1", compute) == {"v": 1}  # reused
    assert cache.run("fit:m@private", "k2", compute) == {"v": 2}  # a new key reruns
    assert len(calls) == 2
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left
    (tmp_path / "fit_m@private.json").write_text("{broken")
    assert StageCache(tmp_path).get("fit:m@private", "k2") is None  # a torn file reruns
    for edited in ("[1]", '{"key": 2, "value": 1}', '{"key": "k2", "seconds": "1", "value": 1}',
                   '{"key": "k2", "seconds": NaN, "value": 1}', '{"key": "k2"}'):  # fmt: skip
        (tmp_path / "fit_m@private.json").write_text(edited)
        assert StageCache(tmp_path).get("fit:m@private", "k2") is None  # so does a bad one
    assert StageCache(tmp_path).run("fit:m@private", "k2", compute) == {"v": 3}
    assert StageCache(tmp_path).get("fit:m@private", "k2") == {"v": 3}  # rewritten


def test_a_fallback_cache_serves_what_this_one_lacks(tmp_path):
    first, other = StageCache(tmp_path / "a"), None
    first.put("eval:base@private", "k", {"v": 1}, 2.0)
    other = StageCache(tmp_path / "b", fallback=first)
    assert other.get("eval:base@private", "k") == {"v": 1}  # an equal key: equal inputs
    assert other.timings["eval:base@private"] == {"seconds": 2.0, "cached": True}
    assert other.get("eval:base@private", "other key") is None
    other.put("eval:base@private", "k", {"v": 2}, 1.0)  # its own entry comes first
    assert other.get("eval:base@private", "k") == {"v": 2}
    assert not (tmp_path / "a" / "eval_base@private.json").read_text().count('"v": 2')
