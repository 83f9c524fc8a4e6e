"""Experts named by hub id, read offline from a hub cache the test builds in
huggingface_hub's own layout (models--owner--name/{blobs,refs,snapshots})."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lorafuse.cli import app
from lorafuse.errors import ExpertError
from lorafuse.formats.hub import parse_ref
from lorafuse.library import ExpertLibrary


def put_in_cache(cache: Path, repo_id: str, files: dict[str, Path], refs: list[str]) -> str:
    """Add one commit of `repo_id` holding `files` (path in repo -> local file) to `cache`,
    with blobs, symlinked snapshot files and `refs` pointing at it; return the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    digest = hashlib.sha1()
    for name, src in sorted(files.items()):
        digest.update(name.encode() + src.read_bytes())
    commit = digest.hexdigest()
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit


def adapter_files(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {prefix + f.name: f for f in folder.iterdir() if f.is_file()}


@pytest.fixture
def hub(llama_experts, tmp_path, monkeypatch):
    """An offline hub cache: owner/expert-a (two commits: main and v1) and owner/bundle
    (adapters in sub-folders x/ and y/)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    put_in_cache(cache, "owner/expert-a", adapter_files(llama_experts[1]), ["v1"])
    put_in_cache(cache, "owner/expert-a", adapter_files(llama_experts[0]), ["main"])
    files = {**adapter_files(llama_experts[2], "x/"), **adapter_files(llama_experts[3], "y/")}
    put_in_cache(cache, "owner/bundle", files, ["main"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # ids are ids only where no such local path exists
    return cache


def same_tensors(a: ExpertLibrary, b: ExpertLibrary) -> bool:
    return all(torch.equal(a.modules[m].A, b.modules[m].A) for m in a.modules)


def test_parse_ref():
    r = parse_ref("owner/name/sub/dir@v1.2")
    assert (r.repo, r.subfolder, r.revision) == ("owner/name", "sub/dir", "v1.2")
    assert parse_ref("owner/name").subfolder == "" and parse_ref("owner/name").revision is None
    assert parse_ref("just-a-name") is None and parse_ref("owner/../x") is None


def test_ids_load_from_the_cache_offline(hub, llama_experts):
    lib = ExpertLibrary.load(["owner/expert-a", "owner/bundle/x", "owner/bundle/y@main"])
    assert lib.names == ["expert-a", "x", "y"]
    assert [e.source for e in lib.experts] == [
        "owner/expert-a",
        "owner/bundle/x",
        "owner/bundle/y@main",
    ]
    local = ExpertLibrary.load([llama_experts[0], llama_experts[2], llama_experts[3]])
    assert same_tensors(lib, local)
    v1 = ExpertLibrary.load(["owner/expert-a@v1"])
    assert same_tensors(v1, ExpertLibrary.load([llama_experts[1]]))


def test_a_text_file_of_ids_and_folders(hub, llama_experts, tmp_path):
    listing = tmp_path / "experts.txt"
    listing.write_text(
        f"# my library\nowner/expert-a\n\n{llama_experts[1]}  # local\nowner/bundle/x\n"
    )
    lib = ExpertLibrary.load([listing])
    assert lib.names == ["expert-a", "e1", "x"]


def test_same_short_names_get_their_ids(hub):
    lib = ExpertLibrary.load(["owner/expert-a", "owner/expert-a@v1"])
    assert lib.names == ["owner/expert-a", "owner/expert-a@v1"]


def test_an_id_neither_cached_nor_reachable_is_a_clear_error(hub):
    with pytest.raises(ExpertError, match="owner/missing.*huggingface-cli download owner/missing"):
        ExpertLibrary.load(["owner/missing"])
    with pytest.raises(ExpertError, match="owner/expert-a@nope"):
        ExpertLibrary.load(["owner/expert-a@nope"])
    with pytest.raises(ExpertError, match="sub-folder 'z' of hub repository owner/bundle"):
        ExpertLibrary.load(["owner/bundle/z"])
    res = CliRunner().invoke(app, ["info", "owner/missing"])
    assert res.exit_code == 2 and "owner/missing" in res.output and "Traceback" not in res.output


def test_cli_takes_ids(hub, tmp_path):
    res = CliRunner().invoke(app, ["info", "owner/expert-a", "owner/bundle/x"])
    assert res.exit_code == 0 and "expert-a" in res.output, res.output
    out = tmp_path / "merged"
    res = CliRunner().invoke(app, ["merge", "owner/expert-a", "owner/bundle/x", "--out", str(out)])
    assert res.exit_code == 0 and (out / "adapter_config.json").is_file(), res.output


def test_a_local_folder_wins_over_an_id(hub, llama_experts, tmp_path):
    local = tmp_path / "owner" / "expert-a"
    shutil.copytree(llama_experts[3], local)
    lib = ExpertLibrary.load(["owner/expert-a"])
    assert lib.experts[0].source is None
    assert same_tensors(lib, ExpertLibrary.load([llama_experts[3]]))


def test_a_spec_kind_may_list_ids_or_a_text_file(hub, llama_dir, tmp_path):
    from lorafuse.spec import LibrarySpec
    from lorafuse.study.stages import setup_key
    from lorafuse.workspace import Workspace

    (tmp_path / "ids.txt").write_text("owner/bundle/x\nowner/bundle/y\n")
    spec = LibrarySpec(
        base_model=str(llama_dir),
        data=str(tmp_path),
        experts={"hub": ["owner/expert-a", "owner/expert-a@v1"], "listed": "ids.txt"},
        root=str(tmp_path),
    )
    ws = Workspace(spec)
    assert ws.library("hub").names == ["owner/expert-a", "owner/expert-a@v1"]
    assert ws.library("listed").names == ["x", "y"]
    key = setup_key(ws)
    (tmp_path / "ids.txt").write_text("owner/bundle/x\n")
    assert setup_key(ws) != key  # the list is part of the setup's identity
