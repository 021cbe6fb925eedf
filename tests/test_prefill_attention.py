"""Prefill attention (model/layers.py `prefill_attention`): a prompt chunk's queries over the cache.

Reference: torch SDPA with `enable_gqa=True` on the same tensors (math kernel), to 1e-5 (float32: the
online softmax over blocks of keys sums in another order) and exactly for bfloat16 (the same SDPA call
with a KV head's query heads folded into rows), both under the math kernel as the engine asks for it;
without that ask (a long forward's pieces) SDPA's own kernel, to 1e-5. Batch invariance under the
engine's ask, exactly: a row's result is the same alone and among other rows, and with more keys past its
mask (a longer cache read). Shapes: batch rows
with their own masks, odd chunk lengths, keys across several blocks, MHA, no mask (causal). No test
asserts on time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llamaforge.model.layers import ATTENTION_BLOCK, prefill_attention


def chunk(bsz: int, n_heads: int, n_kv: int, seqlen: int, keys: int, per_row_mask: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, seqlen, n_heads, 16, generator=g).transpose(1, 2)  # (B, H, T, hd), as the model makes it
    k = torch.randn(bsz, n_kv, keys, 16, generator=g)
    v = torch.randn(bsz, n_kv, keys, 16, generator=g)
    starts = torch.randint(0, keys - seqlen + 1, (bsz if per_row_mask else 1,), generator=g)
    pos = starts[:, None] + torch.arange(seqlen)[None, :]  # (B or 1, T)
    mask = torch.arange(keys)[None, None, None, :] <= pos[:, None, :, None]  # (B or 1, 1, T, keys)
    return q, k, v, mask


def reference(q, k, v, mask):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


SHAPES = [(1, 8, 2, 64, 256, False), (3, 9, 3, 17, 2 * ATTENTION_BLOCK + 64, True), (2, 4, 4, 5, 64, True),
          (1, 6, 1, 33, ATTENTION_BLOCK + 1, False)]


def engine_attention(q, k, v, mask):
    """prefill_attention as the engine calls it: under the math kernel (the blocked online softmax)."""
    with sdpa_kernel(SDPBackend.MATH):
        return prefill_attention(q, k, v, mask)


@pytest.mark.parametrize("attention", [engine_attention, prefill_attention], ids=["engine", "sdpa-choice"])
@pytest.mark.parametrize("bsz,n_heads,n_kv,seqlen,keys,per_row", SHAPES)
def test_matches_sdpa(bsz, n_heads, n_kv, seqlen, keys, per_row, attention):
    q, k, v, mask = chunk(bsz, n_heads, n_kv, seqlen, keys, per_row)
    got = attention(q, k, v, mask)
    assert got.shape == (bsz, n_heads, seqlen, 16)
    torch.testing.assert_close(got, reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.equal(prefill_attention(qb, kb, vb, mask), reference(qb, kb, vb, mask))


def test_a_row_is_the_same_alone_in_a_batch_and_over_more_keys():
    q, k, v, mask = chunk(3, 8, 2, 20, ATTENTION_BLOCK + 128, True, seed=2)
    batch = engine_attention(q, k, v, mask)
    for b in range(3):
        alone = engine_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], mask[b : b + 1])
        assert torch.equal(alone, batch[b : b + 1])
        last = int(mask[b, 0, -1].nonzero().max()) + 1  # keys this row can see
        keys = -(-last // 64) * 64  # the cache read rounded up to 64, as the engine reads it
        cut = engine_attention(q[b : b + 1], k[b : b + 1, :, :keys], v[b : b + 1, :, :keys], mask[b : b + 1, ..., :keys])
        assert torch.equal(cut, batch[b : b + 1])


def test_no_mask_is_causal_from_position_zero():
    q, k, v, _ = chunk(2, 8, 2, 40, 40, False, seed=1)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    torch.testing.assert_close(prefill_attention(q, k, v, None), ref, rtol=1e-5, atol=1e-5)


def test_a_row_is_the_same_in_a_narrower_chunk():
    # The engine right-pads a batch's chunks to the widest: a row's queries must not depend on that width.
    q, k, v, mask = chunk(1, 8, 2, 24, 300, False, seed=3)
    full = engine_attention(q, k, v, mask)
    assert torch.equal(engine_attention(q[:, :, :9], k, v, mask[:, :, :9]), full[:, :, :9])
