"""Quantized (GGUF block) matmul kernels: a C++ AVX2 extension built on first use, and a PyTorch fallback.

`qlinear(x, raw, qtype, out_features, in_features, bias)` computes `F.linear(x, dequantized, bias)`
straight from the GGUF blocks: on a CPU that can run them with the C++ kernels (int8 activations,
integer dot products, ~1e-2 relative error of the output norm), elsewhere by dequantizing in
PyTorch (exact up to matmul rounding). `dequantize` / `dequantize_rows` are exact everywhere.
The layers built on these live in `llamaforge.quantize`.
"""

from __future__ import annotations

from typing import Optional

import torch

from llamaforge.kernels.formats import (
    QTYPES,
    QUANTIZABLE,
    QType,
    check_raw,
    dequantize_torch,
    qtype_info,
    quantize_numpy,
)
from llamaforge.kernels.loader import backend_name, build_extension, default_cache_dir, get_extension

__all__ = [
    "QTYPES",
    "QUANTIZABLE",
    "QType",
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
]

# From this many activation rows on (prefill), the C++ path dequantizes weight tiles and runs an
# fp32 GEMM instead of int8 dot products; measured on 2 AVX2 cores (benchmarks/kernels.py).
GEMM_MIN_ROWS = 48


def qlinear(
    x: torch.Tensor,
    raw: torch.Tensor,
    qtype: str,
    out_features: int,
    in_features: int,
    bias: Optional[torch.Tensor] = None,
    *,
    use_cpp: bool = True,
) -> torch.Tensor:
    """`F.linear(x, dequantize(raw), bias)` for x (..., in_features); the result has x's dtype.

    Uses the C++ kernels for CPU tensors when they are available and `use_cpp`, else the exact
    PyTorch path (which also supports autograd with respect to x).
    """
    info = qtype_info(qtype)
    ext = get_extension() if use_cpp else None
    if ext is not None and x.device.type == "cpu" and raw.device.type == "cpu":
        if torch.compiler.is_compiling():
            return torch.ops.llamaforge.qlinear(x, raw, info.type_id, out_features, in_features, bias, GEMM_MIN_ROWS)
        return ext.qlinear(x, raw, info.type_id, out_features, in_features, bias, GEMM_MIN_ROWS)
    weight = dequantize_torch(raw, info.name, in_features).to(x.dtype)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


def dequantize(raw: torch.Tensor, qtype: str, out_features: int, in_features: int) -> torch.Tensor:
    """All rows as float32 (out_features, in_features), bit-identical to gguf.quants.dequantize."""
    info = qtype_info(qtype)
    ext = get_extension()
    if ext is not None and raw.device.type == "cpu" and raw.is_contiguous():
        return ext.dequantize(raw, info.type_id, out_features, in_features)
    return dequantize_torch(raw, info.name, in_features)


def dequantize_rows(raw: torch.Tensor, index: torch.Tensor, qtype: str, out_features: int, in_features: int) -> torch.Tensor:
    """Rows `index` (any shape) as float32 index.shape + (in_features,): an exact embedding lookup."""
    info = qtype_info(qtype)
    ext = get_extension()
    if ext is not None and raw.device.type == "cpu" and index.device.type == "cpu" and raw.is_contiguous():
        return ext.dequantize_rows(raw, index, info.type_id, out_features, in_features)
    return dequantize_torch(raw[index], info.name, in_features)


def _qlinear_impl(
    x: torch.Tensor, raw: torch.Tensor, type_id: int, n: int, k: int, bias: Optional[torch.Tensor], gemm_rows: int
) -> torch.Tensor:
    ext = get_extension()
    if ext is None:
        name = next(q.name for q in QTYPES.values() if q.type_id == type_id)
        return qlinear(x, raw, name, n, k, bias, use_cpp=False)
    return ext.qlinear(x, raw, type_id, n, k, bias, gemm_rows)


# An opaque op for torch.compile (eager calls go straight to the extension, which is cheaper).
_qlinear_op = torch.library.custom_op("llamaforge::qlinear", _qlinear_impl, mutates_args=())


@_qlinear_op.register_fake
def _qlinear_fake(
    x: torch.Tensor, raw: torch.Tensor, type_id: int, n: int, k: int, bias: Optional[torch.Tensor], gemm_rows: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))
