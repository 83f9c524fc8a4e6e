"""The flan-flat loader: parquet, jsonl and a saved dataset agree; filters; bad input."""

from __future__ import annotations

import json

import pytest

from lorafuse.data.errors import DataError
from lorafuse.data.flan import COLUMNS, DATA_FILE, examples, load_flan, task_names, write_flan
from lorafuse.data.synthetic import generate, make_tasks
from lorafuse.errors import OutputExistsError


@pytest.fixture(scope="module")
def rows():
    return generate(make_tasks("micro"), 30, seed=0)


@pytest.fixture(scope="module")
def parquet_dir(rows, tmp_path_factory):
    return write_flan(rows, tmp_path_factory.mktemp("flan") / "data")


def _jsonl(rows, path):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_parquet_jsonl_and_saved_dataset_give_the_same_rows(rows, parquet_dir, tmp_path):
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    sources = [
        parquet_dir,
        parquet_dir / DATA_FILE,
        _jsonl(rows, tmp_path / "rows.jsonl"),
        tmp_path / "saved",
    ]
    expected = {c: [r[c] for r in rows] for c in COLUMNS}
    for source in sources:
        assert load_flan(source).to_dict() == expected, source


def test_task_filter_and_cap(rows, parquet_dir):
    names = task_names(load_flan(parquet_dir))
    assert names == list(dict.fromkeys(r["task_name"] for r in rows))
    ds = load_flan(parquet_dir, tasks=names[:2], max_per_task=5)
    got = examples(ds, "train")
    assert list(got) == names[:2]
    for name in names[:2]:
        for split in ("train", "test"):
            want = [
                (r["source"], r["target"])
                for r in rows
                if r["task_name"] == name and r["split"] == split
            ]
            assert examples(ds, split)[name] == want[:5]


def test_missing_column_names_the_column(rows, tmp_path):
    bad = [{k: v for k, v in r.items() if k != "template_idx"} for r in rows]
    with pytest.raises(DataError, match="lacks column.*template_idx"):
        load_flan(_jsonl(bad, tmp_path / "bad.jsonl"))


def test_task_without_test_examples(rows, tmp_path):
    victim = rows[0]["task_name"]
    bad = [r for r in rows if not (r["task_name"] == victim and r["split"] == "test")]
    path = _jsonl(bad, tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=f"task {victim} has no examples in split 'test'"):
        load_flan(path)
    assert len(load_flan(path, splits=("train",))) == len(bad)


def test_empty_target_unknown_task_unknown_split(rows, tmp_path):
    bad = [dict(r) for r in rows]
    bad[3]["target"] = "  "
    with pytest.raises(DataError, match="row 3 .*empty target"):
        load_flan(_jsonl(bad, tmp_path / "a.jsonl"))
    with pytest.raises(DataError, match="task.*nope.* not in"):
        load_flan(_jsonl(rows, tmp_path / "b.jsonl"), tasks=["nope"])
    bad = [dict(r) for r in rows]
    bad[0]["split"] = "dev"
    with pytest.raises(DataError, match="split values.*dev"):
        load_flan(_jsonl(bad, tmp_path / "c.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        load_flan(tmp_path / "missing.parquet")


def test_hub_id_goes_through_datasets_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="could not load hub dataset 'nobody/no-such-data'"):
        load_flan("nobody/no-such-data")


def test_write_is_all_or_nothing(rows, parquet_dir, tmp_path):
    with pytest.raises(OutputExistsError):
        write_flan(rows, parquet_dir)
    out = tmp_path / "never"
    with pytest.raises(DataError, match="lack column"):
        write_flan([{"source": "a"}], out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_corrupt_and_empty_files_are_named(rows, parquet_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = (parquet_dir / DATA_FILE).read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"garbage")
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({c: pa.array([], pa.string()) for c in COLUMNS}), str(empty))
    for path, said in [(cut, "not a readable parquet"), (garbage, "not a readable parquet"),
                       (empty, "holds no rows")]:  # fmt: skip
        with pytest.raises(DataError, match=said) as info:
            load_flan(path)
        assert str(path) in str(info.value)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DataError, match="bad.jsonl: cannot be read as json"):
        load_flan(bad_jsonl)
    (tmp_path / "none.jsonl").write_text("")
    with pytest.raises(DataError, match="none.jsonl"):
        load_flan(tmp_path / "none.jsonl")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{trunc")
    with pytest.raises(DataError, match="not a readable saved dataset"):
        load_flan(saved)
