"""Checkpoints: load Meta, Hugging Face and GGUF weights as (ModelArgs, Meta-named state dict), and save them.

    ckpt = checkpoints.load("path/to/model")        # format detected from file contents
    ckpt.args, ckpt.state_dict, ckpt.tokenizer_path, ckpt.gguf_metadata
    checkpoints.save_hf(ckpt.args, ckpt.state_dict, "out/", tokenizer_path=ckpt.tokenizer_path)

State dicts always use Meta's names with q/k rows in Meta's interleaved rotary layout (keymaps.py);
each format's differences are handled in its own module (meta.py, hf.py, gguf.py) and writing in save.py
(Meta, HF) and gguf_write.py (GGUF, llama-quantize).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from llamaforge.checkpoints.detect import detect_format, locate
from llamaforge.checkpoints.gguf import GGUFQuantTensor, dequantize, load_gguf
from llamaforge.checkpoints.hf import hf_to_meta_qk, load_hf, meta_to_hf_qk
from llamaforge.checkpoints.meta import find_shards, load_meta, merge_shards, split_meta_shards
from llamaforge.checkpoints.gguf_write import quantize_gguf, save_gguf
from llamaforge.checkpoints.save import save_hf, save_meta
from llamaforge.errors import CheckpointError, CheckpointNotFoundError
from llamaforge.model.args import ModelArgs

__all__ = [
    "Checkpoint", "TokenizerSource", "GGUFQuantTensor", "detect_format", "load", "save_meta", "save_hf", "save_gguf",
    "quantize_gguf",
    "split_meta_shards", "merge_shards", "hf_to_meta_qk", "meta_to_hf_qk", "dequantize",
    "CheckpointError", "CheckpointNotFoundError",
]

_CONSOLIDATED = re.compile(r"consolidated\.\d+\.pth")


@dataclass(frozen=True, eq=False)
class TokenizerSource:
    """The tokenizer a checkpoint carries: its GGUF vocabulary, or a tokenizer file found with it (or neither).

    Attributes:
        checkpoint: where the checkpoint was loaded from.
        file: tokenizer.model / tokenizer.json found with the checkpoint, or None.
        gguf_metadata: the GGUF metadata holding the vocabulary, or None.
    """

    checkpoint: Path
    file: Optional[Path]
    gguf_metadata: Optional[dict[str, Any]]


@dataclass
class Checkpoint:
    """A loaded checkpoint, in llamaforge's internal (Meta) naming.

    Attributes:
        format: "meta", "hf" or "gguf".
        args: the model's shape.
        state_dict: Meta names -> tensors as stored (dtype as in the file); GGUF quantized tensors are
            dequantized to float32, or GGUFQuantTensor when loaded with keep_quantized=True.
        tokenizer_path: a tokenizer file (tokenizer.model / tokenizer.json) found with the checkpoint, or None.
        gguf_metadata: for GGUF, all metadata as plain Python values (the tokenizer is built from it).
        source: the path the checkpoint was loaded from (a folder, or the GGUF file).
    """

    format: str
    args: ModelArgs
    state_dict: dict[str, Any]
    tokenizer_path: Optional[Path]
    gguf_metadata: Optional[dict[str, Any]]
    source: Path

    @property
    def tokenizer_source(self) -> TokenizerSource:
        """Which tokenizer goes with this checkpoint; `llamaforge.Tokenizer.from_source` builds it."""
        return TokenizerSource(self.source, self.tokenizer_path, self.gguf_metadata)


def _find_tokenizer(folder: Path, prefer: tuple[str, ...], look_in_parent: bool) -> Optional[Path]:
    places = [folder, folder.parent] if look_in_parent else [folder]
    for place in places:  # Llama 2's download keeps tokenizer.model beside the model folders
        for name in prefer:
            if (place / name).is_file():
                return place / name
    return None


def load(path: Union[str, Path], *, progress: bool = True, keep_quantized: bool = False) -> Checkpoint:
    """Load a checkpoint from a file or folder; the format is detected from the contents.

    Args:
        path: a .gguf file, a Meta folder (params.json + consolidated.NN.pth; model-parallel shards are
            merged), a Hugging Face folder (config.json + safetensors or pytorch_model*.bin), or a weight
            file inside either folder.
        progress: show a progress bar while a large (> 1 GB) checkpoint loads.
        keep_quantized: for GGUF, return quantized 2-D weights as GGUFQuantTensor instead of float32.

    Returns:
        A Checkpoint with Meta-named tensors.

    Raises:
        CheckpointNotFoundError: nothing loadable at `path` (the message lists what was found).
        CheckpointError: a checkpoint that is corrupt, truncated, inconsistent or of an unsupported kind.
    """
    where = locate(path)
    folder = where.folder
    if where.format == "gguf":
        gguf_file = where.file if where.file is not None else folder  # locate() names the GGUF file
        args, state_dict, metadata = load_gguf(gguf_file, keep_quantized=keep_quantized, progress=progress)
        return Checkpoint("gguf", args, state_dict, None, metadata, gguf_file)
    if where.format == "meta":
        files = find_shards(folder)
        if where.file is not None and not (
            _CONSOLIDATED.fullmatch(where.file.name) and all(_CONSOLIDATED.fullmatch(f.name) for f in files)
        ):
            files = [where.file]
        args, state_dict = load_meta(folder, files, progress=progress)
        tokenizer = _find_tokenizer(folder, ("tokenizer.model", "tokenizer.json"), look_in_parent=True)
        return Checkpoint("meta", args, state_dict, tokenizer, None, folder)
    args, state_dict = load_hf(folder, where.file, progress=progress)
    tokenizer = _find_tokenizer(folder, ("tokenizer.json", "tokenizer.model"), look_in_parent=False)
    return Checkpoint("hf", args, state_dict, tokenizer, None, folder)
