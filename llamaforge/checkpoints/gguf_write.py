"""Writing GGUF files that llama.cpp (and so Ollama, LM Studio, ...) loads: the writer and llama-quantize.

`save_gguf` writes a Meta-named state dict with the keys llama.cpp's convert_hf_to_gguf.py writes, in
the architecture the `ModelArgs` describe: `llama`, `qwen2` (q/k/v biases) or `qwen3` (per-head q/k
norms); for the latter two the q/k rows go back to the rotate-half layout those architectures use
(see gguf.py). The tokenizer travels as `tokenizer.*` metadata (vocabulary, scores or merges, token
types, pre-tokenizer, special ids, chat template).

Weight types:
- "f32", "f16", "bf16" (as convert_hf_to_gguf --outtype): 2-D weights in that type, 1-D tensors (norms,
  biases) in F32. Tensors that are already quantized (GGUFQuantTensor) are written as they are.
- "q8_0", "q4_0", "q4_k_m", "q6_k" (as llama-quantize TYPE without an importance matrix): llama.cpp's mix
  of types per tensor (`tensor_qtype`, after src/llama-quant.cpp: for Q4_K_M the output layer and some
  attn_v / ffn_down layers in Q6_K, the rest Q4_K, attn_v in Q5_K on what llama.cpp calls a 70B; a row
  length that is not whole blocks falls back as llama.cpp does), quantized bit for bit as its reference quantizers do (gguf_quants.py).

`quantize_gguf(IN, OUT, TYPE)` is `llamaforge quantize`: every tensor of IN read as float32 and
written again with that mix, metadata and tokenizer kept. All writes are atomic (save.atomic_file).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from llamaforge.checkpoints import gguf as gguf_format
from llamaforge.checkpoints import keymaps
from llamaforge.checkpoints.gguf_quants import quantize
from llamaforge.checkpoints.hf import permute_qk_rows
from llamaforge.checkpoints.save import atomic_file, check_args
from llamaforge.errors import CheckpointError
from llamaforge.model.args import ModelArgs
from llamaforge.progress import iterate_bytes, nbytes

PathLike = Union[str, os.PathLike]

# dtype name -> (llama.cpp file type, default ggml type of 2-D weights, llama-quantize mix or plain cast)
FILE_TYPES: dict[str, tuple[str, str, bool]] = {
    "f32": ("ALL_F32", "F32", False),
    "f16": ("MOSTLY_F16", "F16", False),
    "bf16": ("MOSTLY_BF16", "BF16", False),
    "q8_0": ("MOSTLY_Q8_0", "Q8_0", True),
    "q4_0": ("MOSTLY_Q4_0", "Q4_0", True),
    "q4_k_m": ("MOSTLY_Q4_K_M", "Q4_K", True),
    "q6_k": ("MOSTLY_Q6_K", "Q6_K", True),
}
_ALIASES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
# llama-quantize's fallback when a row is not whole blocks of the chosen type (then F16 if still not).
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_BLOCK = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q4_0": 32, "F16": 1, "BF16": 1,
          "F32": 1}

# GGUF value types for the tokenizer keys llama.cpp checks strictly; others are inferred.
_GGUF_KEY_TYPES = {
    "tokenizer.ggml.token_type": ("ARRAY", "INT32"),
    "tokenizer.ggml.scores": ("ARRAY", "FLOAT32"),
    "tokenizer.ggml.tokens": ("ARRAY", "STRING"),
    "tokenizer.ggml.merges": ("ARRAY", "STRING"),
}


def file_type(dtype: Any) -> str:
    """The canonical name ("f16", "q4_k_m", ...) of a GGUF output dtype, or a CheckpointError listing them."""
    kind = str(dtype).lower().replace("torch.", "")
    kind = _ALIASES.get(kind, kind)
    if kind not in FILE_TYPES:
        raise CheckpointError(f"GGUF dtype must be one of {', '.join(FILE_TYPES)}, got {dtype!r}")
    return kind


def gguf_arch(args: ModelArgs) -> str:
    """The llama.cpp architecture these args are: llama, qwen2 (q/k/v biases) or qwen3 (q/k norms)."""
    if args.qk_norm and args.qkv_bias:
        raise CheckpointError("no llama.cpp architecture has both q/k/v biases and per-head q/k norms")
    return "qwen3" if args.qk_norm else "qwen2" if args.qkv_bias else "llama"


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def is_llama_cpp_70b(args: ModelArgs) -> bool:
    """Whether llama.cpp types this model LLM_TYPE_70B (80 layers: llama with grouped-query attention, qwen2),
    which changes its quantization mix (attn_v one step up)."""
    arch = gguf_arch(args)
    return args.n_layers == 80 and (arch == "qwen2" or (arch == "llama" and args.n_heads != args.n_kv_heads))


def tensor_qtype(
    name: str, shape: tuple[int, ...], kind: str, n_layers: int, tied: bool, llama_70b: bool = False
) -> Optional[str]:
    """The ggml type llama-quantize gives GGUF tensor `name` for file type `kind`; None: not quantized (F32).

    After llama.cpp's src/llama-quant.cpp (`tensor_allows_quantization`, `llama_tensor_get_type_impl`,
    `tensor_type_fallback`) for the llama-family tensors llamaforge writes, without an importance matrix.
    `llama_70b`: `is_llama_cpp_70b` of the model.
    """
    if len(shape) < 2 or not name.endswith("weight") or name.endswith("_norm.weight"):
        return None
    _, default, mix = FILE_TYPES[kind]
    if not mix:
        return default
    qtype, ncols = default, shape[-1]
    layer = re.match(r"blk\.(\d+)\.", name)
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        qtype = "Q8_0" if ncols % _BLOCK[default] or default == "Q8_0" else "Q6_K"
    elif kind == "q4_k_m" and layer and name.endswith(("attn_v.weight", "ffn_down.weight")):
        if _use_more_bits(int(layer.group(1)), n_layers):
            qtype = "Q6_K"
    if llama_70b and name.endswith("attn_v.weight") and qtype == "Q4_K":  # 8 heads share each attn_v row
        qtype = "Q5_K"
    if ncols % _BLOCK[qtype]:
        qtype = _FALLBACK.get(qtype, "F16")
        if ncols % _BLOCK[qtype]:
            qtype = "F16"
    return qtype


def metadata_from_args(args: ModelArgs, arch: str = "llama") -> dict[str, tuple[Any, str]]:
    """The `<arch>.*` keys llama.cpp's convert_hf_to_gguf writes for these args: key -> (value, GGUF type)."""
    md: dict[str, tuple[Any, str]] = {
        f"{arch}.vocab_size": (args.vocab_size, "UINT32"),
        f"{arch}.context_length": (args.max_seq_len, "UINT32"),
        f"{arch}.embedding_length": (args.dim, "UINT32"),
        f"{arch}.block_count": (args.n_layers, "UINT32"),
        f"{arch}.feed_forward_length": (args.hidden_dim, "UINT32"),
        f"{arch}.rope.dimension_count": (args.head_dim, "UINT32"),
        f"{arch}.attention.head_count": (args.n_heads, "UINT32"),
        f"{arch}.attention.head_count_kv": (args.n_kv_heads, "UINT32"),
        f"{arch}.attention.layer_norm_rms_epsilon": (float(args.norm_eps), "FLOAT32"),
        f"{arch}.rope.freq_base": (float(args.rope_theta), "FLOAT32"),
    }
    if args.head_dim != args.dim // args.n_heads or arch != "llama":  # convert_hf_to_gguf: whenever config has head_dim
        md[f"{arch}.attention.key_length"] = (args.head_dim, "UINT32")
        md[f"{arch}.attention.value_length"] = (args.head_dim, "UINT32")
    if args.rope_scaling is not None and args.rope_scaling.original_max_position_embeddings != 8192:
        md[f"{arch}.rope.scaling.original_context_length"] = (
            args.rope_scaling.original_max_position_embeddings, "UINT32")
    return md


def _gguf_type(key: str, value: Any) -> tuple[str, Optional[str]]:
    if key in _GGUF_KEY_TYPES:
        return _GGUF_KEY_TYPES[key]
    if isinstance(value, bool):
        return "BOOL", None
    if isinstance(value, int):
        return ("UINT32" if 0 <= value < 1 << 32 else "INT64"), None
    if isinstance(value, float):
        return "FLOAT32", None
    if isinstance(value, str):
        return "STRING", None
    if isinstance(value, (list, tuple)) and value:
        sub = {_gguf_type("", v)[0] for v in value}
        if sub <= {"UINT32", "INT64"}:
            return "ARRAY", "INT32" if all(-(1 << 31) <= v < 1 << 31 for v in value) else "INT64"
        if sub <= {"UINT32", "INT64", "FLOAT32"}:
            return "ARRAY", "FLOAT32"
        if len(sub) == 1:
            return "ARRAY", sub.pop()
    raise CheckpointError(f"cannot store GGUF metadata {key!r} = {str(value)[:60]!r}: unsupported or mixed value type")


def save_gguf(
    args: ModelArgs, state_dict: dict[str, Any], out_path: PathLike, *,
    tokenizer_metadata: Optional[dict[str, Any]] = None, dtype: str = "f32", name: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Write a GGUF file of the llama, qwen2 or qwen3 architecture, with the keys llama.cpp's converter writes.

    Args:
        args: the model's shape, written as `<arch>.*` metadata (+ `rope_freqs.weight` for Llama 3 scaling).
        state_dict: Meta-named tensors (Meta's q/k layout); GGUFQuantTensor values are kept as they are for
            the float dtypes, requantized (unless already of the chosen type) for the quantized ones.
        out_path: destination file.
        tokenizer_metadata: GGUF metadata to copy through: its `tokenizer.*` keys (and general.name) are
            written, e.g. `Checkpoint.gguf_metadata` of a loaded GGUF model, or
            `llamaforge.tokenizers.gguf_export.tokenizer_gguf_metadata` of a tokenizer file.
        dtype: one of FILE_TYPES (see the module docstring).
        name: general.name (default: the metadata's, else "llamaforge").
        overwrite: replace an existing file.

    Returns:
        The output path.
    """
    import gguf
    from gguf.constants import GGMLQuantizationType, GGUFValueType, LlamaFileType

    kind = file_type(dtype)
    check_args(args, state_dict)
    arch = gguf_arch(args)
    meta = dict(tokenizer_metadata or {})
    table = keymaps.invert(keymaps.GGUF_TO_META)
    names = {key: keymaps.rename({key: None}, table, fmt="Meta", source="state_dict") for key in state_dict}
    tied = "output.weight" not in state_dict
    big = is_llama_cpp_70b(args)
    with atomic_file(out_path, overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            writer.add_name(name or meta.get("general.name") or "llamaforge")
            writer.add_file_type(LlamaFileType[FILE_TYPES[kind][0]])
            if FILE_TYPES[kind][2] or any(isinstance(v, gguf_format.GGUFQuantTensor) for v in state_dict.values()):
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for key, (value, vtype) in metadata_from_args(args, arch).items():
                writer.add_key_value(key, value, GGUFValueType[vtype])
            for key, value in meta.items():
                if key.startswith("tokenizer.") and value != []:  # gguf-py cannot store empty arrays
                    vtype, sub = _gguf_type(key, value)
                    writer.add_key_value(key, value, GGUFValueType[vtype], GGUFValueType[sub] if sub else None)
            if args.rope_scaling is not None:
                factors = gguf_format.rope_factors(args.rope_scaling, args.head_dim, args.rope_theta)
                writer.add_tensor("rope_freqs.weight", factors.numpy())
            for key, value in iterate_bytes(state_dict.items(), lambda kv: nbytes(kv[1]), f"writing {Path(out_path).name}"):
                (gguf_name,) = names[key]
                if arch != "llama":  # back to the rotate-half rows of qwen2 / qwen3
                    value = _meta_to_neox(key, value, args)
                qtype = tensor_qtype(gguf_name, tuple(value.shape), kind, args.n_layers, tied, big)
                _add_tensor(writer, gguf_name, value, kind, qtype, GGMLQuantizationType)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return Path(out_path)


def _meta_to_neox(key: str, value: Any, args: ModelArgs) -> Any:
    if isinstance(value, gguf_format.GGUFQuantTensor):
        raw = permute_qk_rows(key, value.raw, args, to_meta=False)
        return value if raw is value.raw else gguf_format.GGUFQuantTensor(raw.contiguous(), value.qtype, value.shape)
    return permute_qk_rows(key, value, args, to_meta=False)


def _add_tensor(writer: Any, name: str, value: Any, kind: str, qtype: Optional[str], qtypes: Any) -> None:
    import gguf.quants

    if isinstance(value, gguf_format.GGUFQuantTensor):
        if not FILE_TYPES[kind][2] or value.qtype == qtype:
            writer.add_tensor(name, value.raw.contiguous().numpy(), raw_dtype=qtypes[value.qtype])
            return
        value = value.dequantize()
    array = value.detach().to("cpu", torch.float32).contiguous().numpy()
    if qtype is None or qtype == "F32":
        writer.add_tensor(name, array)
    elif qtype == "F16":
        writer.add_tensor(name, array.astype(np.float16))
    elif qtype == "BF16":
        writer.add_tensor(name, gguf.quants.quantize(array, qtypes.BF16), raw_dtype=qtypes.BF16)
    else:
        writer.add_tensor(name, quantize(array, qtype), raw_dtype=qtypes[qtype])


def quantize_gguf(
    source: PathLike, output: PathLike, qtype: str, *, allow_requantize: bool = False, overwrite: bool = False
) -> Path:
    """`llama-quantize [--allow-requantize] SOURCE OUTPUT TYPE`: requantize a GGUF file with llama.cpp's mix for TYPE.

    Every tensor is read as float32 (quantized ones dequantized, as llama-quantize does) and written with
    `tensor_qtype`'s choice; the metadata (context length, rope, tokenizer, chat template) is kept. As in
    llama-quantize, a tensor already quantized (not F32/F16/BF16) is only requantized to another type
    with `allow_requantize` (the errors of both quantizations add up).

    Raises:
        CheckpointError: an unreadable source, an unknown TYPE, a quantized source without `allow_requantize`,
            or an existing output without `overwrite`.
    """
    kind = file_type(qtype)
    if Path(source).resolve() == Path(output).resolve():
        raise CheckpointError(f"{output} is the input file; write the quantized model to another path")
    args, state_dict, metadata = gguf_format.load_gguf(source, keep_quantized=True)
    if not allow_requantize:
        tied = "output.weight" not in state_dict
        for key, value in state_dict.items():
            if isinstance(value, gguf_format.GGUFQuantTensor) and value.qtype not in ("F16", "BF16"):
                (name,) = keymaps.rename({key: None}, keymaps.invert(keymaps.GGUF_TO_META), fmt="Meta", source="")
                if tensor_qtype(name, value.shape, kind, args.n_layers, tied, is_llama_cpp_70b(args)) != value.qtype:
                    raise CheckpointError(
                        f"{source}: {name} is already {value.qtype}; requantizing it to {kind} adds a second rounding "
                        "error. Quantize from an F32/F16/BF16 file, or pass --allow-requantize "
                        "(allow_requantize=True) as with llama-quantize"
                    )
    return save_gguf(args, state_dict, output, tokenizer_metadata=metadata, dtype=kind, overwrite=overwrite)
