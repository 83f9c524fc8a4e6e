"""Experts named by hub id: `owner/name`, `owner/name@revision`, `owner/name/sub/folder`.

An id is fetched with huggingface_hub into its own cache (only the adapter files), so a
warm cache serves it with no network, and `HF_HUB_OFFLINE=1` is honoured: an id already
in the cache is read from there, any other is a clear error. Anything that exists on
disk is a local path, never an id. A `.txt` file stands for the ids (or paths) it lists,
one per line (blank lines and `#` comments skipped).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lorafuse.errors import ExpertError

#: owner/name, then optional sub-folders, then an optional @revision (branch, tag, commit)
HUB_REF = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?P<sub>(?:/[\w.-]+)*)(?:@(?P<rev>[\w./-]+))?"
)
#: the files of a PEFT adapter folder lorafuse reads (lorafuse's own side file included)
ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "lorafuse_expert.json",
)


@dataclass(frozen=True)
class HubRef:
    """A parsed expert id: repository, sub-folder inside it (or ""), revision (or None)."""

    repo: str
    subfolder: str = ""
    revision: str | None = None

    def __str__(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"{self.repo}{sub}" + (f"@{self.revision}" if self.revision else "")


def parse_ref(text: str) -> HubRef | None:
    """The HubRef of `text`, or None when it is not shaped like a hub id."""
    m = HUB_REF.fullmatch(str(text))
    if m is None or ".." in str(text).split("@")[0].split("/"):
        return None
    return HubRef(m["repo"], m["sub"].strip("/"), m["rev"])


def is_hub_ref(text: str | Path) -> bool:
    """True when `text` does not exist on disk and is shaped like a hub id."""
    return not Path(text).exists() and parse_ref(str(text)) is not None


def read_id_list(path: Path) -> list[str]:
    """The entries of a text file of ids or paths: one per line, `#` comments skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ExpertError(f"{path} is not a UTF-8 text file of expert ids") from None
    entries = [ln.split("#", 1)[0].strip() for ln in lines]
    entries = [e for e in entries if e]
    if not entries:
        raise ExpertError(f"{path} lists no expert (one id or folder per line)")
    return entries


def expand_lists(entries: Sequence[str | Path]) -> list[str | Path]:
    """Replace each `.txt` file among `entries` by the ids or paths it lists."""
    out: list[str | Path] = []
    for e in entries:
        p = Path(e)
        if p.suffix == ".txt" and p.is_file():
            base = p.parent
            for item in read_id_list(p):  # relative paths are read against the file's folder
                local = base / item
                out.append(local if not Path(item).is_absolute() and local.exists() else item)
        else:
            out.append(e)
    return out


def fetch_adapter(ref: HubRef, cache_dir: str | Path | None = None) -> Path:
    """The local folder of the adapter `ref` names, fetched into the hub cache if needed.

    Only the adapter files are downloaded. Raises ExpertError naming the id and what to
    do when it is neither cached nor reachable, or holds no adapter_config.json.
    """
    from huggingface_hub import snapshot_download

    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    try:
        folder = snapshot_download(
            ref.repo,
            revision=ref.revision,
            allow_patterns=[prefix + f for f in ADAPTER_FILES],
            cache_dir=cache_dir,
        )
    except Exception as e:  # offline, not found, gated, bad revision: one message
        from huggingface_hub import constants

        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise ExpertError(
            f"expert {ref}: no such local folder, not in the local hub cache, and not "
            f"fetched from the hub{offline} "
            f"({type(e).__name__}: {detail}); check the id, or on a machine with network run "
            f"`huggingface-cli download {ref.repo}` (then set HF_HUB_OFFLINE=1 to use the "
            "cache), or pass a local adapter folder"
        ) from None
    path = Path(folder) / ref.subfolder if ref.subfolder else Path(folder)
    if not (path / ADAPTER_FILES[0]).is_file():
        where = f"sub-folder {ref.subfolder!r} of " if ref.subfolder else ""
        raise ExpertError(
            f"expert {ref}: {where}hub repository {ref.repo} holds no {ADAPTER_FILES[0]}; "
            "name the sub-folder of the adapter (owner/name/sub/folder) or a PEFT adapter repo"
        )
    return path


def resolve_experts(
    entries: Sequence[str | Path],
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Local folders for `entries`: local paths as they are, hub ids fetched (cached).

    `.txt` files are expanded first. `progress(1)` is called after each hub id.
    """
    out = []
    for e in expand_lists(entries):
        ref = parse_ref(str(e)) if is_hub_ref(e) else None
        if ref is None:
            out.append(Path(e))
            continue
        out.append(fetch_adapter(ref))
        if progress is not None:
            progress(1)
    return out


def count_hub_refs(entries: Sequence[str | Path]) -> int:
    """How many of `entries` (after expanding `.txt` files) are hub ids to fetch."""
    return sum(is_hub_ref(e) for e in expand_lists(entries))
