"""Quantized (GGUF block) matmul kernels: a C++ AVX2 extension built on first use, and a PyTorch fallback.

`qlinear(x, raw, qtype, out_features, in_features, bias)` computes `F.linear(x, dequantized, bias)`
straight from the blocks: on a CPU that can run them with the C++ kernels (int8 activations,
integer dot products, ~1e-2 relative error of the output norm), elsewhere by dequantizing in
PyTorch (exact up to matmul rounding). `dequantize` / `dequantize_rows` are exact everywhere.

Weights are held in one of two layouts: "gguf" (the file's bytes, every type) or "x8" (all types
but Q5_0/Q5_1, repacked by `repack` into groups of 8 interleaved rows for the C++ kernels, 2-4x
faster, same size). The layers built on these live in `llamaforge.quantize`.
"""

from __future__ import annotations

from typing import Optional

import torch

from llamaforge.kernels.formats import (
    LAYOUTS,
    QTYPES,
    QUANTIZABLE,
    X8_FORMATS,
    QType,
    check_raw,
    dequantize_torch,
    qtype_info,
    quantize_numpy,
    x8_shape,
    x8_to_gguf,
)
from llamaforge.kernels.loader import backend_name, build_extension, default_cache_dir, get_extension

__all__ = [
    "LAYOUTS",
    "QTYPES",
    "QUANTIZABLE",
    "QType",
    "X8_FORMATS",
    "GEMM_MIN_ROWS",
    "backend_name",
    "build_extension",
    "check_raw",
    "default_cache_dir",
    "dequantize",
    "dequantize_rows",
    "dequantize_torch",
    "get_extension",
    "qlinear",
    "qtype_info",
    "quantize_numpy",
    "repack",
    "repack_into",
    "to_gguf_layout",
    "x8_shape",
]

# For weights in the "gguf" layout (K-quants, Q5_*), from this many activation rows on (prefill)
# the C++ path dequantizes weight tiles and runs an fp32 GEMM instead of int8 row dot products.
# The x8 kernels beat the GEMM at every row count measured (benchmarks/kernels.py), so they never do.
GEMM_MIN_ROWS = 48
LAYOUT_IDS = {"gguf": 0, "x8": 1}


def gemm_rows(layout: str) -> int:
    """The `gemm_rows` argument of the C++ qlinear for weights in `layout` (0 = never)."""
    return GEMM_MIN_ROWS if layout == "gguf" else 0


def repack(raw: torch.Tensor, qtype: str, out_features: int, in_features: int) -> tuple[torch.Tensor, str]:
    """GGUF bytes -> (bytes, layout) in the fastest layout the C++ kernels have for `qtype` on this machine.

    The x8 layout for the types that have one, in 2 MiB-aligned MADV_HUGEPAGE memory. F16/BF16 keep their
    layout and stay where they are (a memory-mapped file's pages): a copy into huge-page memory streams
    13-20% faster at decode, but makes load read and copy the whole file (1B BF16: 1.2 -> 10.7 s on a loaded
    machine, 3 s quiet; an 8B F16 file would need 16 GB more at once), against the load target. Returns
    `raw` itself and "gguf" when there is nothing faster (no kernels, non-CPU tensor, F16/BF16, Q5_0/Q5_1,
    a weight under 2 MiB).
    """
    info = qtype_info(qtype)
    ext = get_extension()
    if ext is None or raw.device.type != "cpu":
        return raw, "gguf"
    if info.name not in X8_FORMATS:
        return raw, "gguf"
    return ext.repack_x8(raw.contiguous(), info.type_id, out_features, in_features), "x8"


def repack_into(raw: torch.Tensor, qtype: str, out_features: int, in_features: int, out: torch.Tensor) -> None:
    """Write the x8 bytes of GGUF bytes `raw` into `out` (uint8, contiguous, `x8_shape`'s size): the x8 cache's
    first load repacks straight into the pages of the file it writes. Needs the kernels and an x8 type."""
    info, ext = qtype_info(qtype), get_extension()
    if ext is None or info.name not in X8_FORMATS:
        raise RuntimeError(f"no x8 repack of {qtype} here (the C++ kernels are absent or have no x8 layout for it)")
    ext.repack_x8_into(raw.contiguous(), info.type_id, out_features, in_features, out)


def to_gguf_layout(raw: torch.Tensor, qtype: str, out_features: int, in_features: int, layout: str) -> torch.Tensor:
    """The GGUF bytes (out_features, bytes_per_row) of a weight held in `layout` (exact, any device)."""
    if layout == "gguf":
        return raw
    return x8_to_gguf(raw, qtype_info(qtype).name, out_features, in_features)


def qlinear(
    x: torch.Tensor,
    raw: torch.Tensor,
    qtype: str,
    out_features: int,
    in_features: int,
    bias: Optional[torch.Tensor] = None,
    *,
    layout: str = "gguf",
    use_cpp: bool = True,
) -> torch.Tensor:
    """`F.linear(x, dequantize(raw), bias)` for x (..., in_features); the result has x's dtype.

    Uses the C++ kernels for CPU tensors when they are available and `use_cpp`, else the exact
    PyTorch path (which also supports autograd with respect to x). For BF16 weights both round x to bf16
    first (as the model's own bf16 arithmetic does; kernels/qgemm.h).
    """
    info = qtype_info(qtype)
    ext = get_extension() if use_cpp else None
    if ext is not None and x.device.type == "cpu" and raw.device.type == "cpu":
        args = (x, raw, info.type_id, out_features, in_features, bias, gemm_rows(layout), LAYOUT_IDS[layout])
        if torch.compiler.is_compiling():
            return torch.ops.llamaforge.qlinear(*args)
        return ext.qlinear(*args)
    gguf_raw = to_gguf_layout(raw, info.name, out_features, in_features, layout)
    weight = dequantize_torch(gguf_raw, info.name, in_features).to(x.dtype)
    if info.name == "BF16":  # bf16 activations, as the C++ kernels and the model's own bf16 arithmetic
        x = x.to(torch.bfloat16).to(weight.dtype)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


def dequantize(raw: torch.Tensor, qtype: str, out_features: int, in_features: int, layout: str = "gguf") -> torch.Tensor:
    """All rows as float32 (out_features, in_features), bit-identical to gguf.quants.dequantize."""
    info = qtype_info(qtype)
    ext = get_extension()
    if ext is not None and raw.device.type == "cpu" and raw.is_contiguous():
        return ext.dequantize(raw, info.type_id, out_features, in_features, LAYOUT_IDS[layout])
    gguf_raw = to_gguf_layout(raw, info.name, out_features, in_features, layout)
    return dequantize_torch(gguf_raw, info.name, in_features)


def dequantize_rows(
    raw: torch.Tensor, index: torch.Tensor, qtype: str, out_features: int, in_features: int, layout: str = "gguf"
) -> torch.Tensor:
    """Rows `index` (any shape) as float32 index.shape + (in_features,): an exact embedding lookup."""
    info = qtype_info(qtype)
    ext = get_extension()
    if ext is not None and raw.device.type == "cpu" and index.device.type == "cpu" and raw.is_contiguous():
        return ext.dequantize_rows(raw, index, info.type_id, out_features, in_features, LAYOUT_IDS[layout])
    if layout != "gguf":
        raw = to_gguf_layout(raw, info.name, out_features, in_features, layout)
    return dequantize_torch(raw[index], info.name, in_features)


def _qlinear_impl(
    x: torch.Tensor, raw: torch.Tensor, type_id: int, n: int, k: int, bias: Optional[torch.Tensor], gemm: int, layout: int
) -> torch.Tensor:
    ext = get_extension()
    if ext is None:  # only reachable if a traced graph outlives the kernels; keep it correct
        name = next(q.name for q in QTYPES.values() if q.type_id == type_id)
        return qlinear(x, raw, name, n, k, bias, layout=LAYOUTS[layout], use_cpp=False)
    return ext.qlinear(x, raw, type_id, n, k, bias, gemm, layout)


# An opaque op for torch.compile (eager calls go straight to the extension, which is cheaper).
_qlinear_op = torch.library.custom_op("llamaforge::qlinear", _qlinear_impl, mutates_args=())


@_qlinear_op.register_fake
def _qlinear_fake(
    x: torch.Tensor, raw: torch.Tensor, type_id: int, n: int, k: int, bias: Optional[torch.Tensor], gemm: int, layout: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))
