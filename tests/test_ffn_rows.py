"""A long prompt's feed-forward in pieces of rows (model/layers.py `FeedForward`, `FFN_ROWS`).

Without autograd, when every projection says its rows are independent (the quantized layers on the C++
kernels), a feed-forward of >= 2 * FFN_ROWS rows runs in pieces of >= FFN_ROWS rows, so its (rows, hidden_dim)
activations are never made whole. Reference: the same module on all rows in one call (`_swiglu`), bit for
bit, at every GGUF type (x8 tiles, the gguf layout's fp32 GEMM, the 16-bit weights). Also: the pieces'
sizes, the output shape for (B, T, dim) inputs, row counts that change between calls, an input that is never
written, and the paths that must stay whole (plain nn.Linear, autograd, the exact path). No test asserts on
time or memory.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llamaforge import kernels
from llamaforge.model.layers import FFN_ROWS, FeedForward
from llamaforge.quantize import QuantizedLinear
from tests.test_quantize import ALL_QTYPES, make_raw

pytestmark = pytest.mark.skipif(kernels.get_extension() is None, reason="the C++ kernels are not available here")
DIM, HIDDEN = 256, 512


def quantized_ffn(qtype: str) -> FeedForward:
    ffn = FeedForward(DIM, HIDDEN)
    for i, (name, (out_f, in_f)) in enumerate((("w1", (HIDDEN, DIM)), ("w2", (DIM, HIDDEN)), ("w3", (HIDDEN, DIM)))):
        raw = torch.from_numpy(make_raw(qtype, out_f, in_f, seed=i))
        setattr(ffn, name, QuantizedLinear.from_gguf(raw, qtype, (out_f, in_f)))
    return ffn


def rows_seen(ffn: FeedForward) -> list[int]:
    """The row counts w1 is called with, recorded from now on."""
    seen: list[int] = []
    ffn.w1.register_forward_pre_hook(lambda m, a: seen.append(a[0].numel() // a[0].shape[-1]))
    return seen


@pytest.mark.parametrize("qtype", ALL_QTYPES)
def test_pieces_give_the_bits_of_one_call(qtype: str) -> None:
    ffn = quantized_ffn(qtype)
    seen = rows_seen(ffn)
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for shape in ((2 * FFN_ROWS + 37,), (2, FFN_ROWS + 3), (3 * FFN_ROWS - 1,)):  # row counts change per call
            x = torch.randn(*shape, DIM, generator=g)
            before = x.clone()
            seen.clear()
            got = ffn(x)
            pieces = list(seen)
            assert sum(pieces) == x.numel() // DIM and len(pieces) > 1 and min(pieces) >= FFN_ROWS, pieces
            assert got.shape == x.shape
            assert torch.equal(got, ffn._swiglu(x)), (qtype, shape)
            assert torch.equal(x, before)  # the input is never written, and the output is no view of it
            assert got.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def test_short_inputs_stay_one_call() -> None:
    ffn = quantized_ffn("Q4_0")
    seen = rows_seen(ffn)
    with torch.inference_mode():
        ffn(torch.randn(2 * FFN_ROWS - 1, DIM))
    assert seen == [2 * FFN_ROWS - 1]


def test_paths_without_independent_rows_stay_one_call() -> None:
    x = torch.randn(2 * FFN_ROWS + 5, DIM)
    plain = FeedForward(DIM, HIDDEN)  # nn.Linear: a BLAS may block rows differently at another row count
    assert isinstance(plain.w1, nn.Linear)
    seen = rows_seen(plain)
    with torch.inference_mode():
        plain(x)
    assert seen == [x.shape[0]]
    ffn = quantized_ffn("Q8_0")
    seen = rows_seen(ffn)
    ffn(x.requires_grad_())  # autograd: one differentiable call
    assert seen == [x.shape[0]]
    seen.clear()
    for w in (ffn.w1, ffn.w2, ffn.w3):
        w.exact = True  # training's dequantize-then-matmul path
    with torch.inference_mode():
        ffn(x.detach())
    assert seen == [x.shape[0]]
