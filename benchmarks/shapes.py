"""Llama-shaped GGUF files at the sizes people run, for `benchmarks/compare.py --shape 1b|3b|8b`.

Speed does not depend on the weights' values, so the files hold random weights (normal, std 0.02; norms
ones) in the shapes of Meta's Llama 3.2 1B / 3B and Llama 3.1 8B, with the default model's tokenizer
(SmolLM2's 49,152-token vocabulary, copied from its GGUF: so the embedding and output layers are smaller
than Llama 3's 128,256 rows, 2.4-8% of the weights instead of 8-21%). Llama 3's rope scaling is left out
(it changes no cost). One F16 base file per shape is written once, streamed tensor by tensor (an 8B never
sits in memory), then every type is made from it by llama.cpp's own quantizer (`llama_model_quantize`
through llama-cpp-python), as a llama.cpp user makes them. Files are cached outside the repository in
$LLAMAFORGE_BENCH_CACHE (default ~/.cache/llamaforge/bench-shapes); a file is only remade when missing.
Not run by the tests.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    tied: bool  # output layer = token embedding (Llama 3.2 1B/3B tie, 3.1 8B does not)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


SHAPES = {
    "1b": Shape("Llama-3.2-1B shape", 2048, 16, 32, 8, 8192, True),
    "3b": Shape("Llama-3.2-3B shape", 3072, 28, 24, 8, 8192, True),
    "8b": Shape("Llama-3.1-8B shape", 4096, 32, 32, 8, 14336, False),
}

# file type name -> llama.cpp ftype (llama_ftype enum in llama.h)
FTYPES = {"Q4_0": 2, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7, "F16": 1, "BF16": 32}
ROPE_THETA = 500000.0
CONTEXT = 8192


def cache_dir() -> Path:
    if os.environ.get("LLAMAFORGE_BENCH_CACHE"):
        return Path(os.environ["LLAMAFORGE_BENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llamaforge" / "bench-shapes"


def tensor_list(s: Shape, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, numpy shape (out, in)) of every tensor, in file order."""
    out = [("token_embd.weight", (vocab, s.dim))]
    for i in range(s.n_layers):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", (s.dim,)),
            (p + "attn_q.weight", (s.n_heads * s.head_dim, s.dim)),
            (p + "attn_k.weight", (s.n_kv_heads * s.head_dim, s.dim)),
            (p + "attn_v.weight", (s.n_kv_heads * s.head_dim, s.dim)),
            (p + "attn_output.weight", (s.dim, s.n_heads * s.head_dim)),
            (p + "ffn_norm.weight", (s.dim,)),
            (p + "ffn_gate.weight", (s.ffn, s.dim)),
            (p + "ffn_up.weight", (s.ffn, s.dim)),
            (p + "ffn_down.weight", (s.dim, s.ffn)),
        ]
    out.append(("output_norm.weight", (s.dim,)))
    if not s.tied:
        out.append(("output.weight", (vocab, s.dim)))
    return out


def write_base(shape: str, tokenizer_gguf: Path, dst: Path) -> None:
    """The F16 base file of `shape` with random weights and the tokenizer of `tokenizer_gguf` (atomic)."""
    import gguf
    import numpy as np

    s = SHAPES[shape]
    src = gguf.GGUFReader(str(tokenizer_gguf))
    vocab = len(src.fields["tokenizer.ggml.tokens"].data)
    tmp = dst.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(s.name + " (random weights)")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(s.dim)
    w.add_block_count(s.n_layers)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(1)  # LLAMA_FTYPE_MOSTLY_F16
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            main = field.types[0]
            sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), main, sub_type=sub)
    tensors = tensor_list(s, vocab)
    for name, shp in tensors:
        dtype = np.float32 if len(shp) == 1 else np.float16
        w.add_tensor_info(name, shp, np.dtype(dtype), int(np.prod(shp)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shp in tensors:
        if len(shp) == 1:
            w.write_tensor_data(np.ones(shp, dtype=np.float32))
        else:
            w.write_tensor_data((rng.standard_normal(shp, dtype=np.float32) * 0.02).astype(np.float16))
    w.close()
    tmp.rename(dst)


def shape_files(shape: str, types: list[str], tokenizer_gguf: Path, threads: int) -> dict[str, Path]:
    """type name -> GGUF file of `shape`, made (once) by llama.cpp's quantizer from the F16 base."""
    import ctypes

    import llama_cpp
    from llama_cpp._logger import set_verbose

    unknown = [t for t in types if t not in FTYPES]
    if unknown:
        sys.exit(f"--types: unknown {unknown}; choose from {','.join(FTYPES)}")
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / f"llama-{shape}-random.F16-base.gguf"
    if not base.exists():
        print(f"[compare] writing the {shape} base file {base} (random F16 weights) ...", flush=True)
        write_base(shape, tokenizer_gguf, base)
    set_verbose(False)
    out = {}
    for t in types:
        dst = folder / f"llama-{shape}-random.{t}.gguf"
        if not dst.exists():
            print(f"[compare] llama.cpp quantizer: {base.name} -> {dst.name}", flush=True)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread, params.allow_requantize = FTYPES[t], threads, True
            tmp = dst.with_suffix(".tmp")
            rc = llama_cpp.llama_model_quantize(str(base).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                sys.exit(f"llama_model_quantize to {t} failed with code {rc}")
            tmp.rename(dst)
        out[t] = dst
    return out
