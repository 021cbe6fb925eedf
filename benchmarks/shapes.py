"""Llama-shaped GGUF files at the sizes people run, for `benchmarks/compare.py --shape 1b|3b|8b` and `--matrix`.

Speed does not depend on the weights' values, so the files hold random weights (normal, std 0.02; norms
ones) in the shapes of Meta's Llama 3.2 1B / 3B and Llama 3.1 8B, with the default model's tokenizer
(SmolLM2's 49,152-token vocabulary, copied from its GGUF: so the embedding and output layers are smaller
than Llama 3's 128,256 rows, 2.4-8% of the weights instead of 8-21%). Llama 3's rope scaling is left out
(it changes no cost). One source file per shape is written by gguf-py, streamed tensor by tensor (an 8B never
sits in memory): F16 at 1B and 3B, Q8_0 at 8B (an 8B F16 file is 15 GB; gguf-py's Q8_0 is llama.cpp's
reference quantizer ported to numpy; at 8B, 256 random rows repeat down each matrix, TILE_ROWS). That file is
also the benchmark file of its type; every other type is made from it by llama.cpp's own quantizer
(`llama_model_quantize` through llama-cpp-python), as a llama.cpp user makes them (from Q8_0 at 8B: llama.cpp
picks each tensor's type by name, not by the source's type).
Files are cached outside the repository in $LLAMAFORGE_BENCH_CACHE (default ~/.cache/llamaforge/bench-shapes);
a file is only remade when missing.

    python benchmarks/shapes.py 3b                        # every type of the 3B shape (~23 GB)
    python benchmarks/shapes.py 8b --types Q4_0,Q4_K_M,Q8_0

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
# the type gguf-py writes each shape's source file in (the others are quantized from it)
SOURCE_TYPE = {"1b": "F16", "3b": "F16", "8b": "Q8_0"}
# rows of random weights a quantized source file repeats down each matrix: numpy's Q8_0 quantizer takes minutes
# of a core for an 8B, and speed does not depend on values (every row is still read, none is shared)
TILE_ROWS = 256
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


def file_path(shape: str, type_name: str) -> Path:
    """Where the `type_name` file of `shape` is cached."""
    return cache_dir() / f"llama-{shape}-random.{type_name}.gguf"


def write_source(shape: str, tokenizer_gguf: Path, dst: Path) -> None:
    """The source file of `shape` (SOURCE_TYPE) with random weights and the tokenizer of `tokenizer_gguf` (atomic)."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    s = SHAPES[shape]
    qtype = SOURCE_TYPE[shape]
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
    w.add_file_type(FTYPES[qtype])
    if qtype != "F16":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            main = field.types[0]
            sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), main, sub_type=sub)
    tensors = tensor_list(s, vocab)
    ggml = gguf.GGMLQuantizationType.Q8_0 if qtype == "Q8_0" else None
    for name, shp in tensors:
        if len(shp) == 1:
            w.add_tensor_info(name, shp, np.dtype(np.float32), int(np.prod(shp)) * 4)
        elif ggml is None:
            w.add_tensor_info(name, shp, np.dtype(np.float16), int(np.prod(shp)) * 2)
        else:  # block bytes: 34 per 32 weights
            nbytes = int(np.prod(shp)) // 32 * 34
            w.add_tensor_info(name, shp, np.dtype(np.float32), nbytes, raw_dtype=ggml)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shp in tensors:
        if len(shp) == 1:
            w.write_tensor_data(np.ones(shp, dtype=np.float32))
        elif ggml is None:
            w.write_tensor_data((rng.standard_normal(shp, dtype=np.float32) * 0.02).astype(np.float16))
        else:  # TILE_ROWS random rows, quantized once and repeated down the matrix (rows are blocks of their own)
            rows = quantize(rng.standard_normal((TILE_ROWS, shp[1]), dtype=np.float32) * 0.02, ggml)
            w.write_tensor_data(np.tile(rows, (shp[0] // TILE_ROWS, 1)))
    w.close()
    tmp.rename(dst)


def shape_files(shape: str, types: list[str], tokenizer_gguf: Path, threads: int,
                make: bool = True) -> dict[str, Path]:
    """type name -> GGUF file of `shape`, made (once) by llama.cpp's quantizer from the shape's source file.

    With `make=False` only the files already cached are returned (nothing is written)."""
    import ctypes

    unknown = [t for t in types if t not in FTYPES]
    if unknown:
        sys.exit(f"--types: unknown {unknown}; choose from {','.join(FTYPES)}")
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if not make:
        return {t: file_path(shape, t) for t in types if file_path(shape, t).exists()}
    source = file_path(shape, SOURCE_TYPE[shape])
    missing = [t for t in types if not file_path(shape, t).exists()]
    if missing and not source.exists():
        print(f"[compare] writing the {shape} source file {source} (random {SOURCE_TYPE[shape]} weights) ...",
              flush=True)
        write_source(shape, tokenizer_gguf, source)
    if missing:
        import llama_cpp
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # the quantizer logs every tensor otherwise
    for t in missing:
        dst = file_path(shape, t)
        if dst.exists():  # the source itself
            continue
        print(f"[compare] llama.cpp quantizer: {source.name} -> {dst.name}", flush=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread, params.allow_requantize = FTYPES[t], threads, True
        tmp = dst.with_suffix(".tmp")
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            sys.exit(f"llama_model_quantize to {t} failed with code {rc}")
        tmp.rename(dst)
    return {t: file_path(shape, t) for t in types}


def main(argv: list[str]) -> None:
    """Make the files of one shape (the command in the docstring)."""
    import argparse

    p = argparse.ArgumentParser(description="make the benchmark shape files (benchmarks/shapes.py)")
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("--types", type=lambda x: x.split(","), default=list(FTYPES), help="file types (default: all)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp quantizer threads")
    a = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from llamaforge.default_model import default_model_path

    for t, f in shape_files(a.shape, a.types, default_model_path(), a.threads).items():
        print(f"{t:<7} {f} {f.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main(sys.argv[1:])
