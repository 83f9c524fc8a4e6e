"""Fit files read back: typed fields, the fields a method needs, file and field named."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lorafuse.errors import FileFormatError, LorafuseError
from lorafuse.formats.fits import fit_path, load_fit, read_fit, save_fit


def workspace(tmp_path, names=("a", "b")):
    library = SimpleNamespace(names=list(names))
    spec = SimpleNamespace(root=str(tmp_path))
    return SimpleNamespace(fits_dir=tmp_path / "fits", spec=spec, library=lambda kind: library)


def test_saved_fit_loads(tmp_path):
    ws = workspace(tmp_path)
    payload = {"weights": {"m.q": [0.5, 0.5]}, "experts_order": ["a", "b"], "lr": 0.1}
    save_fit(ws, "weighted", "private", {**payload, "runs": [{"loss": float("nan")}]})
    fit = load_fit(ws, "weighted", "private", need=("weights",))
    assert fit["weights"] == {"m.q": [0.5, 0.5]} and fit["method"] == "weighted"
    save_fit(ws, "ens", "private", {"weights": [[0.2, 0.8]], "space": "deltas"})
    assert read_fit(fit_path(ws, "ens", "private"))["weights"] == [[0.2, 0.8]]


@pytest.mark.parametrize(
    "change, said",
    [
        ({"weights": [0.5, float("nan")]}, "field 'weights': expected a (nested) list of finite"),
        ({"weights": {"m.q": [0.5, "x"]}}, "field 'weights': expected a (nested) list of finite"),
        ({"weights": "0.5,0.5"}, "field 'weights': expected a (nested) list"),
        ({"lr": None, "weights": None}, "field 'weights': expected a (nested) list"),
        ({"lr": float("inf")}, "field 'lr': expected a finite number, got Infinity"),
        ({"space": "sideways"}, "field 'space': expected 'factors' or 'deltas'"),
        ({"experts_order": "a,b"}, "field 'experts_order': expected a list"),
        ({"labels": [0, -1]}, "field 'labels.1': expected a number >= 0"),
        ({"arrow_init": "yes"}, "field 'arrow_init': expected true or false"),
        ({"clusters": 0}, "field 'clusters': expected a number > 0"),
    ],
)
def test_bad_fit_fields(tmp_path, change, said):
    ws = workspace(tmp_path)
    save_fit(ws, "weighted", "private", {"weights": [0.5, 0.5], **change})
    with pytest.raises(FileFormatError, match="fit file") as info:
        load_fit(ws, "weighted", "private", need=("weights",))
    message = str(info.value)
    assert str(fit_path(ws, "weighted", "private")) in message and said in message


def test_broken_missing_and_foreign_fits(tmp_path):
    ws = workspace(tmp_path)
    with pytest.raises(LorafuseError, match="has not been fitted.*lorafuse fit"):
        load_fit(ws, "weighted", "private")
    path = save_fit(ws, "weighted", "private", {"weights": [0.5, 0.5]})
    path.write_text(path.read_text()[:20])
    with pytest.raises(FileFormatError, match="not valid JSON.*"):
        load_fit(ws, "weighted", "private")
    path.write_text(json.dumps([0.5, 0.5]))
    with pytest.raises(FileFormatError, match="an object at the top level, got a list"):
        load_fit(ws, "weighted", "private")
    save_fit(ws, "weighted", "private", {"lr": 0.1})
    with pytest.raises(FileFormatError, match="field 'weights': missing.*lorafuse fit"):
        load_fit(ws, "weighted", "private", need=("weights",))
    save_fit(ws, "weighted", "private", {"weights": [1.0], "experts_order": ["z"]})
    with pytest.raises(LorafuseError, match=r"made for experts \['z'\]"):
        load_fit(ws, "weighted", "private")
