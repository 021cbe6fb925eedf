"""Inference computes a block's elementwise steps in the tensors it just made (model/layers.py `owned_result`).

Exact: the logits without autograd equal, bit for bit (torch.equal), those of the out-of-place expressions
(the same forward with autograd on, where nothing is written in place); a block never writes its input.
"""

import pytest
import torch

from llamaforge.model import KVCache, ModelArgs, Transformer
from llamaforge.model.layers import owned_result

CPU = torch.device("cpu")


def tiny(dtype):
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, hidden_dim=96, max_seq_len=32)
    return Transformer(args).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_logits_equal_the_out_of_place_forward(dtype):
    model = tiny(dtype)
    tokens = torch.randint(0, 101, (2, 9))
    with torch.enable_grad():  # autograd on: every step out of place, as before
        ref_cache = KVCache.for_model(model.args, 2, 16, dtype=dtype, device=CPU)
        ref = model(tokens, 0, ref_cache).detach()
        ref_next = model(tokens[:, :1], 9, ref_cache).detach()
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            cache = KVCache.for_model(model.args, 2, 16, dtype=dtype, device=CPU)
            assert torch.equal(model(tokens, 0, cache), ref)
            assert torch.equal(model(tokens[:, :1], 9, cache), ref_next)
            assert torch.equal(cache.k, ref_cache.k.detach()) and torch.equal(cache.v, ref_cache.v.detach())


@torch.no_grad()
def test_a_block_does_not_write_its_input():
    model = tiny(torch.float32)
    x = torch.randn(1, 5, 64)
    before = x.clone()
    rope = model.rope.tables(torch.arange(5)[None])
    step = model.step_input(x[..., 0].long(), 0)
    out = model.layers[0](x, rope, step)
    assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()
    normed = model.layers[0].ffn_norm(x)
    assert torch.equal(x, before) and normed.data_ptr() != x.data_ptr()


def test_owned_result_rules():
    a, w = torch.randn(3, 4), torch.randn(4)
    with torch.no_grad():
        assert owned_result(a, w)
        assert not owned_result(a, a[0])  # shares a's memory
        assert not owned_result(a, torch.randn(2, 3, 4))  # the result would be larger than a
        assert not owned_result(a.half(), w)  # the result would be float32
    assert not owned_result(a, w)  # autograd on: nothing in place


def test_training_still_differentiates_through_the_blocks():
    model = tiny(torch.float32).train()
    loss = model(torch.randint(0, 101, (1, 6))).logsumexp(-1).mean()
    loss.backward()
    assert model.layers[0].feed_forward.w1.weight.grad is not None
