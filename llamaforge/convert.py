"""Convert any checkpoint llamaforge reads into Meta, Hugging Face or GGUF format.

Weights go through the Meta-named state dict of `llamaforge.checkpoints`; quantized GGUF tensors are
dequantized on the way (a Meta or HF copy of a Q4 file holds exactly the Q4 values). The tokenizer goes
with the weights: a tokenizer file is copied; a GGUF vocabulary becomes tokenizer.json +
tokenizer_config.json (chat template included) for Meta/HF output, and stays GGUF metadata for GGUF output;
a tokenizer file becomes GGUF metadata (tokenizers/gguf_export.py: vocabulary, merges or scores, token
types, pre-tokenizer, chat template). All writes are atomic (see checkpoints/save.py, gguf_write.py).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

from llamaforge import checkpoints
from llamaforge.errors import ConfigError
from llamaforge.tokenizers.gguf_export import sentencepiece_gguf_metadata  # noqa: F401 - the tests' tiny GGUFs use it

log = logging.getLogger("llamaforge")

PathLike = Union[str, os.PathLike]
FORMATS = ("meta", "hf", "gguf")


def convert(
    source: PathLike,
    output: PathLike,
    *,
    to: str,
    dtype: Optional[str] = None,
    tokenizer_path: Optional[PathLike] = None,
    shards: int = 1,
    overwrite: bool = False,
) -> Path:
    """Read `source` (any format) and write it to `output` in format `to` ("meta", "hf" or "gguf").

    Args:
        dtype: float32/bfloat16/float16 for Meta and HF (None keeps the stored dtype; dequantized GGUF
            weights are float32); for GGUF f32/f16/bf16 or, as llama-quantize, q8_0/q4_0/q4_k_m/q6_k
            (default f32; see checkpoints/gguf_write.py).
        tokenizer_path: the tokenizer to ship, when the source carries none.
        shards: model-parallel shards for Meta output.
        overwrite: replace an existing output.
    """
    from llamaforge.tokenizer import Tokenizer

    if to not in FORMATS:
        raise ConfigError(f"unknown output format {to!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"shards must be a positive integer, got {shards!r}")
    if shards != 1 and to != "meta":
        raise ConfigError("--shards applies to Meta output only")
    from llamaforge.hub import resolve_model

    ckpt = checkpoints.load(resolve_model(source), progress=True)
    source = ckpt.tokenizer_source
    carries = tokenizer_path is not None or source.file is not None or source.gguf_metadata is not None
    tokenizer = Tokenizer.from_source(source, tokenizer_path) if carries else None  # converted without one

    if to == "gguf":
        metadata = ckpt.gguf_metadata if tokenizer_path is None else None
        if metadata is None and tokenizer is not None:
            from llamaforge.tokenizers.gguf_export import tokenizer_gguf_metadata

            # checked: the vocabulary rebuilt from the metadata must tokenize a probe text as `tokenizer` does
            metadata = tokenizer_gguf_metadata(tokenizer, ckpt.args.vocab_size,
                                               rebuild=type(tokenizer).from_gguf_metadata)
        elif metadata is None:
            log.warning("no tokenizer found with %s: the GGUF is written without a vocabulary", source)
        return checkpoints.save_gguf(ckpt.args, ckpt.state_dict, output, tokenizer_metadata=metadata,
                                     dtype=dtype or "f32", overwrite=overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        tok_file = None
        if tokenizer is not None:
            if ckpt.gguf_metadata is None and tokenizer_path is None and ckpt.tokenizer_path is not None:
                tok_file = ckpt.tokenizer_path
            else:
                written = tokenizer.save(tmp)
                tok_file = Path(tmp) / written[0]
        if to == "meta":
            return checkpoints.save_meta(ckpt.args, ckpt.state_dict, output, tokenizer_path=tok_file, dtype=dtype,
                                         num_shards=shards, overwrite=overwrite)
        extra = {k: v for k, v in (("bos_token_id", getattr(tokenizer, "bos_id", None)),
                                   ("eos_token_id", getattr(tokenizer, "eos_id", None))) if v is not None}
        return checkpoints.save_hf(ckpt.args, ckpt.state_dict, output, tokenizer_path=tok_file, dtype=dtype,
                                   extra_config=extra, overwrite=overwrite)
