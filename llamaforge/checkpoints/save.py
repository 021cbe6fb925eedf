"""Writing checkpoints in Meta and Hugging Face form (GGUF: gguf_write.py), atomically.

Every writer builds its output under a temporary name in the destination's parent folder, fsyncs the
files and the folder, and only then renames it into place with `os.replace`, so a process killed
mid-write never leaves a half-written checkpoint under the final name (at worst a hidden `.name.*.tmp`
beside it). An existing non-empty destination is refused unless `overwrite=True`; then the old one is
moved aside, the new one renamed in, and the old one deleted.

State dicts use Meta's names (see keymaps.py). `GGUFQuantTensor` values are dequantized for Meta and
Hugging Face output and written unchanged (still quantized) to GGUF.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from llamaforge.checkpoints.gguf import GGUFQuantTensor
from llamaforge.checkpoints import hf as hf_format
from llamaforge.checkpoints import keymaps
from llamaforge.checkpoints import meta as meta_format
from llamaforge.errors import CheckpointError
from llamaforge.model.args import ModelArgs
from llamaforge.progress import iterate_bytes, nbytes

PathLike = Union[str, os.PathLike]
DTypeLike = Union[None, str, torch.dtype]
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


# -- atomic writes --------------------------------------------------------------------------------------

def umask_mode(base: int = 0o666) -> int:
    """The mode `open()` would give a new file (`base` 0o777 for a folder): mkstemp's 0600 is not what users expect."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_destination(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    if not overwrite:
        raise CheckpointError(f"{out} already exists and is not empty; pass overwrite=True to replace it")


@contextlib.contextmanager
def atomic_dir(out_dir: PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir` in one rename."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is a file; a checkpoint is a folder, give a folder path")
    _check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, umask_mode(0o777))
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():  # safetensors' save_file (>= 0.7) leaves 0600 files, unreadable to others
                os.chmod(f, umask_mode())
            _fsync_path(f)
        _fsync_path(tmp)
        if out.exists() and any(out.iterdir()):
            old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        _fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out_path: PathLike, *, overwrite: bool = False, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside `out_path`; on success it replaces `out_path` in one rename.

    `durable=False` skips the fsyncs, for a file whose reader checks every byte anyway (a cache that a
    torn write only makes a miss): a reader sees the old file or the whole new one, never a mixture.
    """
    out = Path(out_path)
    if out.is_dir():
        raise CheckpointError(f"{out} is a directory; give a file path to write")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            _fsync_path(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, out)
        if durable:
            _fsync_path(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- tensors --------------------------------------------------------------------------------------------

def resolve_dtype(dtype: DTypeLike) -> Optional[torch.dtype]:
    """None, a torch floating dtype, or a name like "bfloat16"/"fp16" -> torch dtype (or None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise CheckpointError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch dtype")


def materialize(state_dict: dict[str, Any], dtype: DTypeLike = None) -> dict[str, torch.Tensor]:
    """Plain contiguous CPU tensors: GGUFQuantTensor dequantized, floats cast to `dtype` if given.

    A tensor that is a view into a bigger storage, or shares storage with another (tied weights), is
    copied: torch.save would write the whole storage, and safetensors refuses shared tensors.
    """
    target = resolve_dtype(dtype)
    out = {}
    seen: set[int] = set()
    for key, value in iterate_bytes(state_dict.items(), lambda kv: nbytes(kv[1]), "converting"):
        if isinstance(value, GGUFQuantTensor):
            value = value.dequantize()
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{key}: expected a tensor, got {type(value).__name__}")
        value = value.detach().to("cpu")
        if target is not None and value.is_floating_point():
            value = value.to(target)
        value = value.contiguous()
        storage = value.untyped_storage()
        if storage.nbytes() != value.numel() * value.element_size() or storage.data_ptr() in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


def check_args(args: ModelArgs, state_dict: dict[str, Any]) -> None:
    keymaps.check_state_dict(state_dict, args, source="the state dict to save", config="the ModelArgs given")


def _copy_tokenizer(tokenizer_path: Optional[PathLike], folder: Path, *, with_config: bool) -> None:
    if tokenizer_path is None:
        return
    src = Path(tokenizer_path)
    if not src.is_file():
        raise CheckpointError(f"tokenizer file {src} does not exist")
    with open(src, "rb") as f:
        is_json = f.read(1) == b"{"
    shutil.copyfile(src, folder / ("tokenizer.json" if is_json else "tokenizer.model"))
    if with_config and (src.parent / "tokenizer_config.json").is_file():  # carries the chat template
        shutil.copyfile(src.parent / "tokenizer_config.json", folder / "tokenizer_config.json")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _dtype_name(tensors: dict[str, torch.Tensor]) -> str:
    for t in tensors.values():
        if t.is_floating_point():
            return str(t.dtype).replace("torch.", "")
    return "float32"


# -- the three formats ----------------------------------------------------------------------------------

def save_meta(
    args: ModelArgs, state_dict: dict[str, Any], out_dir: PathLike, *, tokenizer_path: Optional[PathLike] = None,
    dtype: DTypeLike = None, num_shards: int = 1, vocab_parallel_embedding: bool = False, overwrite: bool = False,
) -> Path:
    """Write a Meta checkpoint: params.json + consolidated.00.pth ... (+ the tokenizer file).

    Args:
        args: the model's shape; written as Meta's params.json keys (see meta.py).
        state_dict: Meta-named tensors.
        out_dir: destination folder (created; must be empty or absent unless `overwrite`).
        tokenizer_path: tokenizer file to copy in (as tokenizer.model, or tokenizer.json if JSON).
        dtype: cast floating tensors (e.g. "bfloat16"); None keeps them.
        num_shards: model-parallel shards to write (Meta's MP), split as fairscale does.
        vocab_parallel_embedding: shard the embedding on the vocabulary (Llama 3) rather than on dim.
        overwrite: replace an existing non-empty `out_dir`.

    Returns:
        The output folder.
    """
    check_args(args, state_dict)
    params = meta_format.params_from_args(args)
    tensors = materialize(state_dict, dtype)
    shards = meta_format.split_meta_shards(tensors, args, num_shards, vocab_parallel_embedding=vocab_parallel_embedding)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _write_json(tmp / "params.json", params)
        for rank, shard in enumerate(shards):
            torch.save(shard, tmp / f"consolidated.{rank:02d}.pth")
        _copy_tokenizer(tokenizer_path, tmp, with_config=True)
    return Path(out_dir)


def save_hf(
    args: ModelArgs, state_dict: dict[str, Any], out_dir: PathLike, *, tokenizer_path: Optional[PathLike] = None,
    dtype: DTypeLike = None, max_shard_bytes: Optional[int] = None, extra_config: Optional[dict[str, Any]] = None,
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face checkpoint: config.json + model.safetensors (or shards + index) (+ tokenizer).

    Args:
        args: the model's shape, written as a LlamaForCausalLM config.json.
        state_dict: Meta-named tensors (q/k in Meta's layout; permuted here for Hugging Face).
        out_dir: destination folder (created; must be empty or absent unless `overwrite`).
        tokenizer_path: tokenizer file to copy in (and a tokenizer_config.json beside it, if any).
        dtype: cast floating tensors; None keeps them.
        max_shard_bytes: split into model-0000i-of-0000n.safetensors files of at most this size
            (a single tensor larger than it gets a file of its own) plus model.safetensors.index.json.
        extra_config: keys merged into config.json (e.g. bos_token_id, eos_token_id).
        overwrite: replace an existing non-empty `out_dir`.

    Returns:
        The output folder.
    """
    from safetensors.torch import save_file

    check_args(args, state_dict)
    tensors = hf_format.to_hf_state_dict(args, materialize(state_dict, dtype))
    config = hf_format.config_from_args(args, _dtype_name(tensors))
    config.update(extra_config or {})
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][key] = t
        size += nbytes
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _write_json(tmp / "config.json", config)
        if max_shard_bytes is None:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, group in enumerate(groups):
                name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                save_file(group, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in group})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            _write_json(tmp / hf_format.SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        _copy_tokenizer(tokenizer_path, tmp, with_config=True)
    return Path(out_dir)
