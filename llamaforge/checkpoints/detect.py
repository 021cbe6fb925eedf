"""Which checkpoint format a path holds, decided from file contents.

A file is classified by its first bytes: `GGUF` magic, a safetensors header (8-byte length + '{'), or a
torch.save file (zip archive, or a legacy pickle). A folder is Meta if it has params.json and torch
`*.pth` files, Hugging Face if it has config.json and safetensors/bin weights, GGUF if it holds exactly
one GGUF file. A weight file inside such a folder also works (params.json/config.json are read from
beside it). File names are only used where the formats themselves define them (params.json,
config.json, the index, Meta's `*.pth` shard glob).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llamaforge.checkpoints.gguf import is_gguf
from llamaforge.checkpoints.hf import BIN_INDEX, SAFETENSORS_INDEX, is_safetensors
from llamaforge.checkpoints.meta import find_shards, is_torch_file
from llamaforge.errors import CheckpointError, CheckpointNotFoundError

EXPECTED = (
    "expected one of: a .gguf file; a Meta folder (params.json + consolidated.NN.pth); a Hugging Face "
    "folder (config.json + model.safetensors, or sharded model-*.safetensors + model.safetensors.index.json, "
    "or pytorch_model*.bin)"
)


@dataclass
class Located:
    """Where a checkpoint's parts are: its format, folder and (when the user named one) file."""

    format: str
    folder: Path
    file: Optional[Path] = None


def _listing(folder: Path, limit: int = 15) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError as e:
        return f"(cannot list: {e})"
    if not names:
        return "nothing (the folder is empty)"
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def locate(path: str | Path) -> Located:
    """Find the checkpoint at `path` (a file or a folder) and its format.

    Raises:
        CheckpointNotFoundError: the path does not exist or holds no checkpoint (the message lists
            what was found and what is expected).
        CheckpointError: the folder is ambiguous (e.g. several GGUF files).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint path {path} does not exist; {EXPECTED}")
    if path.is_file():
        return _locate_file(path)
    return _locate_dir(path)


def _locate_file(path: Path) -> Located:
    folder = path.parent
    if is_gguf(path):
        return Located("gguf", folder, path)
    if path.name in ("params.json", "config.json"):
        return _locate_dir(folder)
    if is_safetensors(path):
        if (folder / "config.json").is_file():
            return Located("hf", folder, path)
        raise CheckpointNotFoundError(
            f"{path} is a safetensors file but {folder} has no config.json beside it; {EXPECTED}"
        )
    if is_torch_file(path):
        if (folder / "params.json").is_file():
            return Located("meta", folder, path)
        if (folder / "config.json").is_file():
            return Located("hf", folder, path)
        raise CheckpointNotFoundError(
            f"{path} is a PyTorch file but {folder} has neither params.json (Meta) nor config.json "
            f"(Hugging Face) beside it; {EXPECTED}"
        )
    with open(path, "rb") as f:
        head = f.read(8)
    raise CheckpointNotFoundError(f"{path} is not a checkpoint file (it starts with {head!r}); {EXPECTED}")


def _locate_dir(folder: Path) -> Located:
    has_params = (folder / "params.json").is_file()
    has_config = (folder / "config.json").is_file()
    # Contents are checked when the files are read, so a corrupt shard is reported by name.
    shards = find_shards(folder) if has_params else []
    hf_weights = has_config and (
        (folder / SAFETENSORS_INDEX).is_file() or (folder / BIN_INDEX).is_file()
        or any(p.is_file() for p in folder.glob("*.safetensors")) or any(p.is_file() for p in folder.glob("*.bin"))
    )
    if shards and hf_weights:
        raise CheckpointError(
            f"{folder} holds both a Meta checkpoint (params.json + {shards[0].name}) and a Hugging Face one "
            "(config.json + weights); pass the path of one weight file to choose"
        )
    if shards:
        return Located("meta", folder)
    if hf_weights:
        return Located("hf", folder)
    ggufs = sorted(p for p in folder.iterdir() if p.is_file() and is_gguf(p))
    if len(ggufs) == 1:
        return Located("gguf", folder, ggufs[0])
    if len(ggufs) > 1:
        raise CheckpointError(
            f"{folder} holds {len(ggufs)} GGUF files ({', '.join(p.name for p in ggufs)}); pass the one to load"
        )
    hint = ""
    if has_params:
        hint = " (params.json is there, but no consolidated.NN.pth weights)"
    elif has_config:
        hint = " (config.json is there, but no safetensors or pytorch_model*.bin weights)"
    raise CheckpointNotFoundError(f"no checkpoint in {folder}{hint}: found {_listing(folder)}; {EXPECTED}")


def detect_format(path: str | Path) -> str:
    """The checkpoint format at `path`: "meta", "hf" or "gguf", decided from file contents.

    Raises:
        CheckpointNotFoundError: nothing loadable there (the message lists what was found and what is expected).
    """
    return locate(path).format
