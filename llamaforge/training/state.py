"""Resumable training state on disk, written atomically.

`save_state(path, state)` writes with `torch.save` to a temporary file in the same folder, fsyncs it,
renames it over `path` with `os.replace` (atomic on POSIX and Windows) and fsyncs the folder. A process
killed at any moment therefore leaves either the previous complete checkpoint or the new complete one
under `path`, never a torn file; at worst a stray `.checkpoint.pt.*.tmp` that the next save removes.

`load_state` reads with `weights_only=True`: a checkpoint holds only tensors and plain values (the
config and the model shape as dicts), so loading never runs code from the file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from llamaforge.checkpoints.save import umask_mode
from llamaforge.errors import CheckpointError, TrainingDiverged, TrainingError  # noqa: F401 (re-exported)

STATE_VERSION = 1
STATE_FILE = "checkpoint.pt"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically (temporary file + fsync + os.replace + folder fsync)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())  # mkstemp makes 0600; the run's other files follow the umask
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a training state written by `save_state`.

    Raises:
        CheckpointError: the file is missing, unreadable, or not a llamaforge training state.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no training checkpoint at {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for a damaged file
        raise CheckpointError(f"training checkpoint {p} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{p} is not a llamaforge training checkpoint (version {STATE_VERSION})")
    return state


def rng_state() -> dict[str, Any]:
    """torch's CPU (and CUDA) generator states, to restore dropout and sampling exactly on resume."""
    out: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
