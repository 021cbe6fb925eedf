"""Prefill attention (model/layers.py `prefill_attention`): grouped-query heads folded into rows.

Reference: torch SDPA with `enable_gqa=True` on the same tensors, under the math kernel the engine's
prefill uses (exact equality: the same products in the same order) and under the default kernels
(float tolerance 1e-5). Shapes: several batch rows, odd chunk lengths, a mask shared by the batch and
one per row, MHA (no grouping), and no mask (plain causal). No test asserts on time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llamaforge.model.layers import prefill_attention


def chunk(bsz: int, n_heads: int, n_kv: int, seqlen: int, keys: int, per_row_mask: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, seqlen, n_heads, 16, generator=g).transpose(1, 2)  # (B, H, T, hd), as the model makes it
    k = torch.randn(bsz, n_kv, keys, 16, generator=g)
    v = torch.randn(bsz, n_kv, keys, 16, generator=g)
    starts = torch.randint(0, keys - seqlen + 1, (bsz if per_row_mask else 1,), generator=g)
    pos = starts[:, None] + torch.arange(seqlen)[None, :]  # (B or 1, T)
    mask = torch.arange(keys)[None, None, None, :] <= pos[:, None, :, None]  # (B or 1, 1, T, keys)
    return q, k, v, mask


@pytest.mark.parametrize("bsz,n_heads,n_kv,seqlen,keys,per_row", [
    (1, 8, 2, 64, 256, False), (3, 9, 3, 17, 128, True), (2, 4, 4, 5, 64, True), (1, 6, 1, 33, 96, False),
])
def test_grouped_rows_equal_enable_gqa(bsz, n_heads, n_kv, seqlen, keys, per_row):
    q, k, v, mask = chunk(bsz, n_heads, n_kv, seqlen, keys, per_row)
    want_gqa = n_heads != n_kv
    with sdpa_kernel(SDPBackend.MATH):
        got = prefill_attention(q, k, v, mask)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=want_gqa)
    assert got.shape == (bsz, n_heads, seqlen, 16)
    assert torch.equal(got, want)
    got = prefill_attention(q, k, v, mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=want_gqa)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_mask_is_causal_from_position_zero():
    q, k, v, _ = chunk(2, 8, 2, 40, 40, False, seed=1)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    torch.testing.assert_close(prefill_attention(q, k, v, None), ref, rtol=1e-5, atol=1e-5)
