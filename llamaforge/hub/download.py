"""The network side of model references: fetch what a reference needs into the Hugging Face cache.

One `model_info` call lists the repository at the revision (with sizes and hashes), `select.plan`
picks the files, and `hf_hub_download` fetches each one into huggingface_hub's cache (HF_ENDPOINT,
HF_TOKEN, locking, resuming an interrupted transfer with a Range request). A file that was downloaded
is then checked against the Hub's hash (SHA-256 for large files, the git blob id for small ones) and
thrown away if it does not match. huggingface_hub is imported here only, when a download is needed.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llamaforge.errors import CheckpointNotFoundError, HubError
from llamaforge.hub import select, store
from llamaforge.hub.refs import ModelRef

log = logging.getLogger("llamaforge.hub")


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


@dataclass(frozen=True)
class Pulled:
    """A reference fetched into the cache."""

    ref: ModelRef
    path: Path  # what Llama.build loads: the GGUF file (first part), or the snapshot folder
    format: str
    quant: Optional[str]
    commit: str
    files: tuple[Path, ...]
    downloaded: int  # bytes transferred by this call (0: everything was cached already)


def _progress_class(enabled: bool, label: str):
    from tqdm.auto import tqdm

    class Bar(tqdm):
        """huggingface_hub's bar for one file, in bytes, named by the file, shown or hidden by `progress`."""

        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["desc"] = label
            kwargs["disable"] = not enabled or store.env_true("HF_HUB_DISABLE_PROGRESS_BARS")
            kwargs.setdefault("unit", "B")
            kwargs.setdefault("unit_scale", True)
            kwargs["unit_divisor"] = 1024
            super().__init__(*args, **kwargs)

    return Bar


def _is_network_error(exc: BaseException) -> bool:
    """A transport failure of whichever HTTP client this huggingface_hub release uses (httpx or requests)."""
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"TransportError", "ConnectError", "TimeoutException", "ConnectionError", "Timeout",
                         "RemoteProtocolError", "NetworkError"}) or isinstance(exc, (ConnectionError, TimeoutError,
                                                                                      socket.gaierror))


def _hub_error(exc: BaseException, ref: ModelRef) -> Exception:
    """A llamaforge error saying what went wrong with `ref` on the Hub, and what to do."""
    from huggingface_hub import errors as hf
    from huggingface_hub import get_token

    where = endpoint()
    token_hint = ("check that your token (HF_TOKEN, or `hf auth login`'s) is the one with access"
                  if get_token() else "set HF_TOKEN to an access token (or run `hf auth login`)")
    if isinstance(exc, hf.GatedRepoError):
        return HubError(
            f"{ref.repo_id} is a gated repository: accept its terms at {where}/{ref.repo_id} while logged in, "
            f"then {token_hint} with read access to it"
        )
    if isinstance(exc, hf.RepositoryNotFoundError):
        return CheckpointNotFoundError(
            f"no model {ref.repo_id!r} on the Hub ({where}): check the name (org/name, case-sensitive); if it is "
            f"private, {token_hint}. If you meant a local path, it does not exist"
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return CheckpointNotFoundError(
            f"{ref.repo_id} has no revision {ref.rev!r}; use one of its branches, tags or commits after '@'"
        )
    if isinstance(exc, getattr(hf, "RemoteEntryNotFoundError", ())):
        return CheckpointNotFoundError(f"a file of {ref} is missing on the Hub ({exc}); run the command again")
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return CheckpointNotFoundError(
            f"{ref} is not in the Hugging Face cache ({store.cache_dir()}) and HF_HUB_OFFLINE is set; unset it to "
            f"download, or run `llamaforge pull {ref}` on a machine with network access to this cache"
        )
    if isinstance(exc, hf.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        return HubError(f"the Hub ({where}) refused to serve {ref} (HTTP {status}): {str(exc).splitlines()[0]}; "
                        "try again later")
    return HubError(
        f"cannot reach the Hub at {where} to fetch {ref} ({type(exc).__name__}: {exc}); check the network or "
        f"HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use only models already in the cache ({store.cache_dir()})"
    )


def _cache_error(exc: OSError, what: str, cache: Path) -> HubError:
    """A file system failure while writing into the cache (disk full, no permission, read-only), said as such."""
    reason = exc.strerror or str(exc)
    hint = {errno.ENOSPC: "free some space there (`llamaforge rm` removes cached models)",
            errno.EDQUOT: "free some space there (`llamaforge rm` removes cached models)",
            errno.EACCES: "make it writable, or point HF_HUB_CACHE at a folder you can write",
            errno.EPERM: "make it writable, or point HF_HUB_CACHE at a folder you can write",
            errno.EROFS: "point HF_HUB_CACHE at a folder on a writable file system"}.get(
                exc.errno, "check the folder, or point HF_HUB_CACHE elsewhere")
    where = f" ({exc.filename})" if exc.filename else ""
    return HubError(f"cannot write {what} into the Hugging Face cache {cache}: {reason}{where}; {hint}, "
                    "then run the command again (a partial download resumes where it stopped)")


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1()
    h.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(path: Path, sibling, ref: ModelRef) -> None:
    """Compare a freshly downloaded file with the Hub's hash; drop it (blob and link) if they differ."""
    lfs = getattr(sibling, "lfs", None)
    if lfs is not None and getattr(lfs, "sha256", None):
        expected, actual, kind = lfs.sha256, _sha256(path), "SHA-256"
    elif getattr(sibling, "blob_id", None):
        expected, actual, kind = sibling.blob_id, _git_blob_sha1(path), "git blob id"
    else:
        return
    if actual != expected:
        blob = path.resolve()
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise HubError(
            f"{sibling.rfilename} of {ref} was downloaded but its {kind} is {actual}, not the Hub's {expected}; "
            "the copy was deleted, run the command again"
        )


def pull(ref: ModelRef, *, progress: bool = True) -> Pulled:
    """Fetch a reference's files into the cache (only those missing), asking the Hub for its revision.

    Raises:
        CheckpointNotFoundError: no such repository, revision or quant (the message lists the quants).
        HubError: gated or private without a token, no network, the Hub failed, or the cache cannot be
            written (disk full, no permission).
    """
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache

    cache = store.cache_dir()
    if store.offline():
        cached = store.find_cached(ref, cache)
        if cached is None:
            raise CheckpointNotFoundError(
                f"{ref} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: unset it to download, "
                "or pick a model that is cached (`llamaforge list`)")
        log.info("HF_HUB_OFFLINE is set: %s is used as cached", ref)
        return _pulled_from_cache(ref, cached, cache)
    try:
        info = HfApi(endpoint=endpoint()).model_info(ref.repo_id, revision=ref.rev, files_metadata=True)
    except Exception as exc:
        if _is_hub_or_network(exc):
            raise _hub_error(exc, ref) from None
        raise
    commit = info.sha
    siblings = {s.rfilename: s for s in info.siblings or []}
    listing = [select.RepoFile(s.rfilename, s.size) for s in siblings.values()]
    fetched: dict[str, Path] = {}
    downloaded = 0

    def fetch(name: str) -> Path:
        nonlocal downloaded
        if name in fetched:
            return fetched[name]
        was_cached = isinstance(try_to_load_from_cache(ref.repo_id, name, cache_dir=cache, revision=commit), str)
        try:
            path = Path(hf_hub_download(ref.repo_id, name, revision=commit, cache_dir=cache, endpoint=endpoint(),
                                        tqdm_class=_progress_class(progress, name)))
        except Exception as exc:
            if _is_hub_or_network(exc):
                raise _hub_error(exc, ref) from None
            if isinstance(exc, OSError):
                raise _cache_error(exc, f"{name} of {ref}", cache) from None
            raise
        if not was_cached:
            _check(path, siblings[name], ref)
            downloaded += path.stat().st_size
        fetched[name] = path
        return path

    def read_index(name: str) -> Optional[dict]:
        import json

        return json.loads(fetch(name).read_text()) if name in siblings else None

    chosen = select.plan(listing, ref.quant, ref.repo_id, read_index)
    missing = [f for f in chosen.files if f not in siblings]
    if missing:
        raise CheckpointNotFoundError(f"{ref.repo_id} names files it does not hold: {', '.join(missing)}")
    paths = tuple(fetch(name) for name in chosen.files)
    try:
        store.write_ref(ref, commit, cache)
    except OSError as exc:
        raise _cache_error(exc, f"the revision of {ref}", cache) from None
    snapshot = store.repo_folder(ref.repo_id, cache) / "snapshots" / commit
    path = snapshot / chosen.primary if chosen.primary else snapshot
    return Pulled(ref, path, chosen.format, chosen.quant, commit, paths, downloaded)


def _is_hub_or_network(exc: BaseException) -> bool:
    from huggingface_hub import errors as hf

    return isinstance(exc, (hf.HfHubHTTPError, hf.OfflineModeIsEnabled, hf.EntryNotFoundError)) or _is_network_error(exc)


def _pulled_from_cache(ref: ModelRef, path: Path, cache: Path) -> Pulled:
    commit = store.cached_commit(ref, cache) or ""
    snapshot = store.repo_folder(ref.repo_id, cache) / "snapshots" / commit
    found = store.local_plan(ref.repo_id, ref.quant, snapshot)
    files = tuple(snapshot / f for f in found.files) if found else (path,)
    return Pulled(ref, path, found.format if found else "?", found.quant if found else None, commit, files, 0)
