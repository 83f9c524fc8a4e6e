"""A build's own files read back on resume (clusters.json, structure.json): typed fields,
the file and field named, before any work starts."""

from __future__ import annotations

import json

import pytest

from lorafuse.benchmark.build import saved_clusters
from lorafuse.benchmark.structure import measure_kind
from lorafuse.errors import FileFormatError

CLUSTERS = {
    "k": 2,
    "adjusted_rand_index": 0.5,
    "clusters": [{"name": "cluster_0", "tasks": ["a", "b"]}, {"tasks": ["c"]}],
}


def test_saved_clusters_good_and_absent(tmp_path):
    assert saved_clusters(tmp_path) is None
    (tmp_path / "clusters.json").write_text(json.dumps(CLUSTERS))
    assert saved_clusters(tmp_path) == CLUSTERS


@pytest.mark.parametrize(
    "change, said",
    [
        ({"clusters": [{"tasks": "a,b"}]}, "field 'clusters.0.tasks': expected a list"),
        ({"clusters": [{"tasks": []}]}, "field 'clusters.0.tasks': expected at least 1 item"),
        ({"clusters": [{"name": "c"}]}, "field 'clusters.0.tasks': missing (expected a list)"),
        ({"clusters": None}, "field 'clusters': expected a list, got null"),
        ({"adjusted_rand_index": float("nan")}, "'adjusted_rand_index': expected a finite"),
    ],
)
def test_bad_clusters_file(tmp_path, change, said):
    (tmp_path / "clusters.json").write_text(json.dumps({**CLUSTERS, **change}))
    with pytest.raises(FileFormatError, match="clusters.json") as info:
        saved_clusters(tmp_path)
    assert said in str(info.value)


@pytest.mark.parametrize(
    "saved, said",
    [
        ({"kinds": {}, "off_task_per_expert": {}}, "field 'base_losses': missing"),
        ({"base_losses": {"a": None}, "kinds": {}, "off_task_per_expert": {}},
         "field 'base_losses.a': expected a number, got null"),
        ({"base_losses": {"a": 1.0}, "kinds": [], "off_task_per_expert": {}},
         "field 'kinds': expected an object, got a list"),
        ([], "expected an object at the top level"),
    ],
)  # fmt: skip
def test_bad_structure_file_is_refused_before_any_work(tmp_path, saved, said):
    (tmp_path / "structure.json").write_text(json.dumps(saved))
    with pytest.raises(FileFormatError, match="structure.json") as info:
        measure_kind(tmp_path, ["a"], settings=None, kind="mbc")
    assert said in str(info.value)
