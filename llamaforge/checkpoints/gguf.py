"""GGUF (llama.cpp) checkpoints: metadata -> ModelArgs, tensors -> Meta-named state dict.

The header is read and validated by the one GGUF reader (`gguf_reader.py`: bounds, counts, key types,
duplicate names), so this module works on trusted, typed values. Tensor data stays in the file mapping.

Quantized tensors are dequantized to float32 by default (dequant.py: bit-exact with
`gguf.quants.dequantize`). With `keep_quantized=True` quantized 2-D weights are returned as
`GGUFQuantTensor` (raw blocks, untouched) for quantized Linears.

Architectures: `llama` (Llama 1/2/3, Mistral, SmolLM, ...; optional q/k/v biases are read when present),
`qwen2` (Qwen2 / Qwen2.5: q/k/v biases) and `qwen3` (per-head q/k RMSNorm); the differences are
`ModelArgs` fields, detected from the tensor table. A `llama` GGUF stores q/k rows in Meta's
interleaved-pair rotary layout (llama.cpp's converter undoes Hugging Face's permutation); `qwen2` and
`qwen3` keep Hugging Face's rotate-half ("neox") layout, so their q/k rows (and biases and norm
weights) are permuted here exactly as hf.py does, quantized rows included (a row of ggml blocks moves
as a whole). ggml lists dimensions innermost-first, so a ggml [in, out] weight is the numpy and torch
(out, in) matrix.
"""

from __future__ import annotations

import logging
import math
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from llamaforge.checkpoints import keymaps
from llamaforge.checkpoints.dequant import can_dequantize, dequantize, gguf_version
from llamaforge.checkpoints.gguf_reader import GGUF_MAGIC, GGUFFile, GGUFTensorInfo, read_gguf
from llamaforge.errors import CheckpointError, ConfigError
from llamaforge.model.args import ModelArgs, RopeScaling
from llamaforge.progress import iterate_bytes

log = logging.getLogger(__name__)

# Architectures whose GGUF tensors and keys are llama's, up to the optional parts in keymaps.GGUF_TO_META.
# Others (gemma, phi3, ...) have other norms, activations or names, so they are refused rather than loaded wrongly.
LLAMA_ARCHS = ("llama", "qwen2", "qwen3")
# Those whose q/k rows are in the rotate-half layout (llama.cpp's LLAMA_ROPE_TYPE_NEOX).
NEOX_ARCHS = ("qwen2", "qwen3")


@dataclass
class GGUFQuantTensor:
    """A quantized GGUF weight kept as stored: raw ggml blocks, one row of blocks per output row.

    Attributes:
        raw: torch.uint8 tensor (rows, bytes_per_row), the file's bytes.
        qtype: ggml type name, e.g. "Q4_1", "Q8_0", "Q6_K".
        shape: logical (out_features, in_features) of the dequantized weight.
    """

    raw: torch.Tensor
    qtype: str
    shape: tuple[int, int]
    mapping: Any = field(default=None, repr=False, compare=False)  # the mmap.mmap that `raw` views, if any
    # The GGUF file these bytes come from (what a cache of their repacked form is keyed by), if any.
    origin: Optional[GGUFFile] = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        """Drop the file pages under `raw` from this process's memory once a copy of them is held elsewhere.

        The mapping is a private, unmodified map of the file, so a later read of `raw` reads the file
        again: nothing is lost. Only whole pages inside `raw` are dropped (neighbours stay mapped).
        """
        if self.mapping is None or self.raw.numel() == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = self.raw.data_ptr() - _address(self.mapping)
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (start + self.raw.numel()) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self.mapping.madvise(mmap.MADV_DONTNEED, first, last - first)

    def populate(self) -> bool:
        """Fault the file pages under `raw` into this process now (`populate`); True if done."""
        return populate([self]) == self.nbytes

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def dequantize(self) -> torch.Tensor:
        """The float32 (out, in) weight these blocks encode."""
        return dequantize(self.raw, self.qtype, self.shape)


def populate(tensors: list[GGUFQuantTensor]) -> int:
    """Fault the file pages under these tensors into this process now, as the first forward would; returns the
    bytes of the tensors done.

    Pages the page cache holds cost ~0.1 s of one core per GB to map, here or at the first forward. Here it is
    a numpy reduction reading one byte per page (the page-fault path, with the kernel's fault-around and
    readahead), which runs without the GIL, once per run of neighbouring tensors in one mapping (few calls:
    each return waits for the GIL, which another thread may hold for up to 5 ms), so `Llama.build` overlaps
    it with the tokenizer. (`madvise(MADV_POPULATE_READ)`, as llama.cpp's MAP_POPULATE, was measured here
    too: on a machine whose page cache had dropped the file it read page by page, 40 s for a 2 GB F16 file
    against 2-9 s through faults.) 0 for tensors that view no mapping.
    """
    spans = sorted((t.raw.data_ptr(), t.raw.data_ptr() + t.nbytes, id(t.mapping), t) for t in tensors
                   if t.mapping is not None and t.nbytes > 0)
    runs: list[list[Any]] = []  # [start, end, tensors]
    for start, end, mapping, t in spans:
        if runs and runs[-1][2][0].mapping is t.mapping and start - runs[-1][1] <= _NEIGHBOURS:
            runs[-1][1] = max(runs[-1][1], end)  # the gap is alignment padding: one call for both
            runs[-1][2].append(t)
        else:
            runs.append([start, end, [t]])
    for start, end, group in runs:
        mapping = group[0].mapping
        offset = start - _address(mapping)
        fault_in(torch.frombuffer(mapping, dtype=torch.uint8, count=end - start, offset=offset))
    return sum(t.nbytes for *_, group in runs for t in group)


def fault_in(view: torch.Tensor) -> None:
    """Read one byte of every page of a (mapped) uint8 tensor, without the GIL, on this thread alone (a numpy
    reduction: a torch one would start an OpenMP pool whose spinning workers take the core the tokenizer
    beside it needs)."""
    flat = view.reshape(-1)
    if flat.numel():
        np.add.reduce(flat.numpy()[:: mmap.PAGESIZE], dtype=np.uint64)


_NEIGHBOURS = 1 << 16  # tensors at most this far apart in one mapping are faulted in by one call


def _address(buffer: Any) -> int:
    """The address of a writable buffer's first byte (an mmap opened with ACCESS_COPY)."""
    return torch.frombuffer(buffer, dtype=torch.uint8, count=1).data_ptr()


# -- metadata -> ModelArgs ------------------------------------------------------------------------------

def rope_factors(scaling: RopeScaling, head_dim: int, theta: float) -> torch.Tensor:
    """llama.cpp's `rope_freqs.weight` for Llama 3 scaling: ggml divides each frequency by its factor."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling.factor)
        else:
            smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor)
            factors.append(1.0 / ((1 - smooth) / scaling.factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def rope_scaling_from_factors(
    factors: torch.Tensor, metadata: dict[str, Any], head_dim: int, theta: float, source: str
) -> RopeScaling:
    """The Llama 3 RopeScaling whose factors equal a GGUF `rope_freqs.weight` (rtol 1e-4)."""
    factors = factors.to(torch.float32).reshape(-1)
    if factors.numel() != head_dim // 2:
        raise CheckpointError(
            f"{source}: rope_freqs.weight has {factors.numel()} entries, expected head_dim/2 = {head_dim // 2}"
        )
    arch = metadata.get("general.architecture", "llama")
    orig = metadata.get(f"{arch}.rope.scaling.original_context_length", 8192)
    scale = float(factors.max())
    candidates = [RopeScaling(scale, 1.0, 4.0, int(orig))]
    smooth_idx = [i for i, f in enumerate(factors.tolist()) if 1.0 < f < scale]
    if len(smooth_idx) >= 2 and scale > 1:
        # In the smooth band s = (orig / wavelen - low) / (high - low) is linear in 1/wavelen; two points fix it.
        freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        (i, j) = smooth_idx[0], smooth_idx[-1]
        s = [(1 / float(factors[k]) - 1 / scale) / (1 - 1 / scale) for k in (i, j)]
        x = [float(freqs[k]) / (2 * math.pi) for k in (i, j)]  # 1 / wavelen
        if x[0] != x[1]:
            a = (s[0] - s[1]) / (x[0] - x[1])  # = orig / (high - low)
            b = a * x[0] - s[0]  # = low / (high - low)
            if a > 0 and b > 0:
                low = b * orig / a
                candidates.append(RopeScaling(scale, low, low + orig / a, int(orig)))
    for cand in candidates:
        try:
            if torch.allclose(rope_factors(cand, head_dim, theta), factors, rtol=1e-4, atol=0):
                return cand
        except ConfigError:
            continue
    raise CheckpointError(
        f"{source}: rope_freqs.weight (factors {[round(f, 4) for f in factors.tolist()[:8]]}...) does not match "
        "Llama 3 rotary scaling for any factor/low/high/original context; this rope scaling is not supported"
    )


def _get(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    if isinstance(value, list):  # some architectures give per-layer arrays; llama's are uniform
        if len(set(value)) != 1:
            raise CheckpointError(f"GGUF metadata {key} varies per layer ({value[:8]}...); not supported")
        value = value[0]
    return value


def args_from_gguf(gf: GGUFFile) -> ModelArgs:
    """ModelArgs from a GGUF file's `llama.*` metadata and tensor table.

    Raises:
        CheckpointError: another architecture, missing keys, mixture-of-experts, unsupported rope scaling.
    """
    md, src = gf.metadata, str(gf.path)
    arch = md.get("general.architecture")
    if arch not in LLAMA_ARCHS:
        raise CheckpointError(
            f"{src}: general.architecture is {arch!r}; llamaforge loads GGUF files of the architectures "
            f"{', '.join(repr(a) for a in LLAMA_ARCHS)} (Llama 1/2/3, Mistral 7B, TinyLlama, SmolLM, Qwen2/2.5, Qwen3)"
        )
    if md.get("split.count", 1) > 1:
        raise CheckpointError(
            f"{src} is part {md.get('split.no', 0) + 1} of a {md['split.count']}-file split GGUF; merge the "
            "parts first (llama-gguf-split --merge)"
        )
    if _get(md, f"{arch}.expert_count", 0):
        raise CheckpointError(f"{src}: mixture-of-experts GGUF models ({arch}.expert_count > 0) are not supported")
    required = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
    missing = [f"{arch}.{k}" for k in required if f"{arch}.{k}" not in md]
    if missing:
        raise CheckpointError(f"{src}: GGUF metadata lacks {', '.join(missing)}; the file is incomplete")
    for key in required:
        value = _get(md, f"{arch}.{key}")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{src}: GGUF metadata {arch}.{key} = {value!r} is not a positive integer")
    dim = _get(md, f"{arch}.embedding_length")
    n_heads = _get(md, f"{arch}.attention.head_count")
    head_dim = _get(md, f"{arch}.attention.key_length") or (dim // n_heads if n_heads else None)
    value_dim = _get(md, f"{arch}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise CheckpointError(f"{src}: key_length {head_dim} != value_length {value_dim} is not supported")
    rot = _get(md, f"{arch}.rope.dimension_count", head_dim)
    if rot != head_dim:
        raise CheckpointError(
            f"{src}: rope.dimension_count={rot} but head_dim={head_dim}; partial rotary embeddings are not supported"
        )
    theta = _get(md, f"{arch}.rope.freq_base", 10000.0)
    scaling_type = md.get(f"{arch}.rope.scaling.type", "none")
    scaling_factor = _get(md, f"{arch}.rope.scaling.factor", 1.0)
    if scaling_type not in ("none", "") and scaling_factor not in (0, 1, 1.0):
        raise CheckpointError(
            f"{src}: rope scaling type {scaling_type!r} (factor {scaling_factor}) is not supported; "
            "llamaforge implements Llama 3 frequency scaling (rope_freqs.weight) only"
        )
    rope_scaling = None
    if "rope_freqs.weight" in gf.tensors:
        info = gf.tensors["rope_freqs.weight"]
        factors = dequantize(gf.raw(info), info.qtype, info.shape)
        if not torch.all(factors == 1):
            rope_scaling = rope_scaling_from_factors(factors, md, head_dim, theta, src)
    embd = gf.tensors.get("token_embd.weight")
    vocab = _get(md, f"{arch}.vocab_size") or len(md.get("tokenizer.ggml.tokens", ())) or (
        embd.shape[0] if embd is not None else 0)
    ctx = _get(md, f"{arch}.context_length")
    if ctx is None:
        ctx = 2048
        log.warning("%s: no %s.context_length in GGUF metadata; assuming 2048", src, arch)
    try:
        return ModelArgs(
            dim=dim, n_layers=_get(md, f"{arch}.block_count"), n_heads=n_heads, vocab_size=vocab,
            n_kv_heads=_get(md, f"{arch}.attention.head_count_kv", n_heads), head_dim=head_dim,
            hidden_dim=_get(md, f"{arch}.feed_forward_length"),
            norm_eps=_get(md, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5), rope_theta=theta,
            rope_scaling=rope_scaling, max_seq_len=ctx, tie_embeddings="output.weight" not in gf.tensors,
            qkv_bias="blk.0.attn_q.bias" in gf.tensors, qk_norm="blk.0.attn_q_norm.weight" in gf.tensors,
        )
    except ConfigError as e:
        raise CheckpointError(f"{src}: GGUF metadata describes an invalid model: {e}") from e


# -- tensors --------------------------------------------------------------------------------------------

_AS_STORED = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def load_gguf(
    path: str | Path, *, keep_quantized: bool = False, progress: bool = False
) -> tuple[ModelArgs, dict[str, Any], dict[str, Any]]:
    """Load a Llama GGUF file as (ModelArgs, Meta-named state dict, plain-python metadata).

    Float tensors keep their stored dtype (F32/F16/BF16) and share the file mapping; quantized ones
    are dequantized to float32, or, with `keep_quantized`, 2-D ones (and 2-D F16/BF16 ones) are
    returned as GGUFQuantTensor.

    Raises:
        CheckpointError: see `read_gguf`, `args_from_gguf`; unknown/missing tensors; undecodable types.
    """
    gf = read_gguf(path)
    args = args_from_gguf(gf)
    names = {n: i for n, i in gf.tensors.items() if n != "rope_freqs.weight"}
    renamed = keymaps.rename(
        names, keymaps.GGUF_TO_META, fmt="GGUF", source=str(gf.path), ignored=keymaps.IGNORED["gguf"]
    )
    keymaps.check_state_dict(renamed, args, source=str(gf.path), config="its GGUF metadata")
    state_dict: dict[str, Any] = {}
    neox = gf.metadata.get("general.architecture") in NEOX_ARCHS
    for meta_name, info in iterate_bytes(renamed.items(), lambda item: item[1].nbytes, f"loading {gf.path.name}",
                                         enabled=progress):
        value = _tensor(gf, info, keep_quantized)
        state_dict[meta_name] = _neox_to_meta(meta_name, value, args) if neox else value
    return args, state_dict, dict(gf.metadata)


def _neox_to_meta(key: str, value: Any, args: ModelArgs) -> Any:
    """A q/k weight, bias or norm in the rotate-half layout -> Meta's interleaved pairs (others unchanged)."""
    from llamaforge.checkpoints.hf import permute_qk_rows

    if isinstance(value, GGUFQuantTensor):
        raw = permute_qk_rows(key, value.raw, args, to_meta=True)
        return value if raw is value.raw else GGUFQuantTensor(raw.contiguous(), value.qtype, value.shape,
                                                              origin=value.origin)
    return permute_qk_rows(key, value, args, to_meta=True)


# Float types that `keep_quantized` also keeps as stored bytes (weight-only 16-bit layers on the CPU).
_KEPT_FLOATS = ("F16", "BF16")


def _tensor(gf: GGUFFile, info: GGUFTensorInfo, keep_quantized: bool) -> Any:
    raw = gf.raw(info)
    if keep_quantized and info.qtype in _KEPT_FLOATS and len(info.shape) == 2:
        rows = info.shape[0]
        return GGUFQuantTensor(raw=raw.view(rows, -1), qtype=info.qtype, shape=(rows, info.shape[1]), mapping=gf.buffer,
                               origin=gf)
    if info.qtype in _AS_STORED:
        return raw.view(_AS_STORED[info.qtype]).reshape(info.shape)
    if not can_dequantize(info.qtype):
        raise CheckpointError(
            f"{gf.path}: tensor {info.name!r} has type {info.qtype}, which neither llamaforge nor the installed "
            f"{gguf_version()} can decode; requantize the model (Q8_0, Q4_K_M, Q6_K or F16)"
        )
    if keep_quantized and len(info.shape) == 2:
        rows = info.shape[0]
        return GGUFQuantTensor(raw=raw.view(rows, -1), qtype=info.qtype, shape=(rows, info.shape[1]), mapping=gf.buffer,
                               origin=gf)
    return dequantize(raw, info.qtype, info.shape)


def is_gguf(path: Path) -> bool:
    """Whether a file starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False
