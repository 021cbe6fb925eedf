"""The local side of model references: the Hugging Face cache, read and pruned without the network.

The cache is huggingface_hub's (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`),
shared with transformers, llama.cpp's `-hf` and the `hf` CLI:

    models--org--name/refs/main              the commit the branch pointed to when last fetched
    models--org--name/snapshots/<commit>/F   a link to blobs/<etag>, one per downloaded file
    models--org--name/blobs/<etag>           the file's bytes (etag = sha256 for large files)

Environment variables are read when called, not at import, so a process may change them.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llamaforge.errors import CheckpointNotFoundError
from llamaforge.hub import select
from llamaforge.hub.refs import COMMIT, ModelRef


def cache_dir() -> Path:
    """Where huggingface_hub keeps downloads, by the same environment variables it reads."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def env_true(*names: str) -> bool:
    """The first of these environment variables that is set holds a true value, as huggingface_hub reads them."""
    value = next((os.environ[n] for n in names if os.environ.get(n)), "")
    return value.upper() in ("1", "ON", "YES", "TRUE")


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value: never touch the network."""
    return env_true("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def repo_folder(repo_id: str, cache: Optional[Path] = None) -> Path:
    return (cache or cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def cached_commit(ref: ModelRef, cache: Optional[Path] = None) -> Optional[str]:
    """The commit a reference's revision points to in the cache, or None if it was never fetched."""
    if ref.revision is not None and COMMIT.match(ref.revision):
        return ref.revision
    ref_file = repo_folder(ref.repo_id, cache) / "refs" / ref.rev
    try:
        commit = ref_file.read_text().strip()
    except OSError:
        return None
    return commit if COMMIT.match(commit) else None


def write_ref(ref: ModelRef, commit: str, cache: Optional[Path] = None) -> None:
    """Record that the reference's branch/tag points at `commit` (atomically), so offline use finds it."""
    if ref.revision is not None and COMMIT.match(ref.revision):
        return
    ref_file = repo_folder(ref.repo_id, cache) / "refs" / ref.rev
    ref_file.parent.mkdir(parents=True, exist_ok=True)
    # one temporary name per thread: two pulls of one reference in one process must not share it
    tmp = ref_file.with_name(ref_file.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref_file)


def snapshot_files(snapshot: Path) -> list[select.RepoFile]:
    """The complete files of a snapshot folder (a link whose blob is missing does not count)."""
    files = []
    if not snapshot.is_dir():
        return files
    for path in sorted(snapshot.rglob("*")):
        if path.is_file():  # follows the link to the blob
            files.append(select.RepoFile(path.relative_to(snapshot).as_posix(), path.stat().st_size))
    return files


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def local_plan(repo_id: str, quant: Optional[str], snapshot: Path) -> Optional[select.Plan]:
    """What a snapshot folder holds for a reference, if all of it is there; None otherwise."""
    files = snapshot_files(snapshot)
    if not files:
        return None
    try:
        found = select.plan(files, quant, repo_id, lambda name: _read_json(snapshot / name))
    except CheckpointNotFoundError:
        return None
    present = {f.path for f in files}
    return found if all(f in present for f in found.files) else None


def find_cached(ref: ModelRef, cache: Optional[Path] = None) -> Optional[Path]:
    """The local path of a reference already complete in the cache (no network), or None."""
    commit = cached_commit(ref, cache)
    if commit is None:
        return None
    snapshot = repo_folder(ref.repo_id, cache) / "snapshots" / commit
    found = local_plan(ref.repo_id, ref.quant, snapshot)
    if found is None:
        return None
    return snapshot / found.primary if found.primary else snapshot


@dataclass(frozen=True)
class CachedModel:
    """One loadable model in the cache, as `llamaforge list` shows it."""

    name: str  # the reference that loads it: org/name[:QUANT][@revision]
    format: str  # "gguf" or "hf"
    quant: Optional[str]
    size: int  # bytes on disk
    path: Path  # what Llama.build loads: the GGUF file, or the snapshot folder
    files: tuple[Path, ...]  # every snapshot entry it consists of
    revision: str  # the refs pointing at its commit ("main"), or the commit itself

    def to_dict(self) -> dict:
        return {"name": self.name, "format": self.format, "quant": self.quant, "size": self.size,
                "path": str(self.path), "revision": self.revision}


def list_models(cache: Optional[Path] = None) -> list[CachedModel]:
    """Every loadable model in the cache: one per GGUF file (or split), one per safetensors snapshot."""
    cache = cache or cache_dir()
    if not cache.is_dir():
        return []
    from huggingface_hub import scan_cache_dir

    models: list[CachedModel] = []
    for repo in sorted(scan_cache_dir(cache).repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: -r.last_modified):
            refs = sorted(rev.refs)
            label = ",".join(refs) if refs else rev.commit_hash
            suffix = "" if "main" in refs else f"@{refs[0] if refs else rev.commit_hash}"
            snapshot = Path(rev.snapshot_path)
            files = snapshot_files(snapshot)
            for m in select.gguf_models(files):
                quant = f":{m.quant}" if m.quant else ""
                models.append(CachedModel(
                    f"{repo.repo_id}{quant}{suffix}", "gguf", m.quant, m.size or 0, snapshot / m.parts[0].path,
                    tuple(snapshot / p.path for p in m.parts), label,
                ))
            hf = select.hf_files(files, lambda name: _read_json(snapshot / name))
            if hf is not None and all((snapshot / f).is_file() for f in hf):
                size = sum((snapshot / f).stat().st_size for f in hf)
                models.append(CachedModel(f"{repo.repo_id}{suffix}", "hf", None, size, snapshot,
                                          tuple(snapshot / f for f in hf), label))
    return models


@dataclass
class Removal:
    """What `remove` will delete; `execute()` does it."""

    description: list[str]
    freed: int
    _strategy: object

    def execute(self) -> None:
        self._strategy.execute()  # type: ignore[attr-defined]


def plan_removal(ref: ModelRef, cache: Optional[Path] = None) -> Removal:
    """Plan deleting a reference from the cache: `org/name` is the whole repository (every revision and
    quant), `org/name:QUANT` only that quant's files, `@REVISION` limits either to that revision.

    Raises:
        CheckpointNotFoundError: nothing of the reference is in the cache.
    """
    cache = cache or cache_dir()
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache) if cache.is_dir() else None
    repo = next((r for r in info.repos if r.repo_id == ref.repo_id and r.repo_type == "model"), None) if info else None
    if repo is None:
        raise CheckpointNotFoundError(f"{ref.repo_id} is not in the cache ({cache}); `llamaforge list` shows what is")
    revisions = list(repo.revisions)
    if ref.revision is not None:
        revisions = [r for r in revisions if ref.revision in r.refs or r.commit_hash == ref.revision]
        if not revisions:
            raise CheckpointNotFoundError(f"revision {ref.revision!r} of {ref.repo_id} is not in the cache ({cache})")
    if ref.quant is None:
        strategy = info.delete_revisions(*(r.commit_hash for r in revisions))
        what = [f"{ref.repo_id} ({len(revisions)} revision(s), {repo.repo_path})"]
        return Removal(what, strategy.expected_freed_size, strategy)
    targets = []
    for rev in revisions:
        snapshot = Path(rev.snapshot_path)
        for m in select.gguf_models(snapshot_files(snapshot)):
            if m.quant == ref.quant:
                names = {p.path for p in m.parts}
                targets += [f for f in rev.files if Path(f.file_path).relative_to(snapshot).as_posix() in names]
    if not targets:
        have = sorted({m.quant or "?" for r in revisions for m in select.gguf_models(snapshot_files(Path(r.snapshot_path)))})
        raise CheckpointNotFoundError(
            f"no {ref.quant} file of {ref.repo_id} is in the cache; cached quants: {', '.join(have) or 'none'}"
        )
    strategy = info.delete_files(*targets) if hasattr(info, "delete_files") else _FileDeletion(info, targets)
    return Removal([str(f.file_path) for f in targets], strategy.expected_freed_size, strategy)


class _FileDeletion:
    """HFCacheInfo.delete_files for huggingface_hub releases before it (2.x): unlink the snapshot entries,
    then each blob no other cached file links to."""

    def __init__(self, info, targets) -> None:
        selected = {f.file_path for f in targets}
        kept = {f.blob_path for r in info.repos for rev in r.revisions for f in rev.files if f.file_path not in selected}
        self.files = [f.file_path for f in targets]
        self.blobs = {f.blob_path: f.size_on_disk for f in targets if f.blob_path not in kept}
        self.expected_freed_size = sum(self.blobs.values())

    def execute(self) -> None:
        for path in self.files:
            Path(path).unlink(missing_ok=True)
        for blob in self.blobs:
            Path(blob).unlink(missing_ok=True)
