"""A long forward over a KV cache in pieces of UBATCH positions, and `keep` (model/transformer.py, layers.py).

Without autograd, `Transformer.forward` of more than UBATCH tokens over a cache from an int start runs the
model on pieces of UBATCH positions in turn (llama.cpp's n_ubatch), and `keep` runs the last block's
feed-forward on the wanted positions alone (llama.cpp's inp_out_ids). References: the same forward in one
call (UBATCH larger than the prompt) on the same float32 weights, logits and cache within atol 1e-5 (the
pieces read the cache in other matmul shapes, so not bit for bit); and hidden states gathered after a full
forward for `keep`, within the same tolerance. Also: which row counts the blocks see, a one-position last
piece, a batch of two, a start past 0, Meta's lock-step generate (greedy tokens equal, logprobs close) and
the paths that stay whole (autograd, no cache, a tensor of positions). No test asserts on time or memory.
"""

from __future__ import annotations

import pytest
import torch

from llamaforge.generation.generate import generate
from llamaforge.generation.sampler import SamplingParams
from llamaforge.model import KVCache, ModelArgs, Transformer
from llamaforge.model import transformer as transformer_module

CPU = torch.device("cpu")
PIECE = 16
ATOL = 1e-5


def tiny() -> Transformer:
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, hidden_dim=96, max_seq_len=128)
    return Transformer(args).eval()


def positions_seen(model: Transformer) -> tuple[list[int], list[int]]:
    """The sequence lengths the first block is called with, and the row counts of the last block's FFN."""
    blocks: list[int] = []
    ffn: list[int] = []
    model.layers[0].register_forward_pre_hook(lambda m, a: blocks.append(a[0].shape[1]))
    model.layers[-1].feed_forward.register_forward_pre_hook(lambda m, a: ffn.append(a[0].shape[1]))
    return blocks, ffn


def run(model: Transformer, tokens: torch.Tensor, start: int, *, ubatch: int, last_only: bool = False,
        prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
    saved = transformer_module.UBATCH
    transformer_module.UBATCH = ubatch
    try:
        cache = KVCache.for_model(model.args, tokens.shape[0], 128, device=CPU)
        with torch.inference_mode():
            if prefix is not None:
                model(prefix, 0, cache)
            return model(tokens, start, cache, last_only=last_only), cache
    finally:
        transformer_module.UBATCH = saved


@pytest.mark.parametrize("seqlen", [3 * PIECE + 1, 2 * PIECE, 2 * PIECE + 7])
@pytest.mark.parametrize("bsz", [1, 2])
def test_pieces_equal_one_forward(seqlen: int, bsz: int) -> None:
    model = tiny()
    tokens = torch.randint(0, 101, (bsz, seqlen), generator=torch.Generator().manual_seed(seqlen))
    ref, ref_cache = run(model, tokens, 0, ubatch=10**6)
    blocks, ffn = positions_seen(model)
    got, cache = run(model, tokens, 0, ubatch=PIECE)
    sizes = [min(PIECE, seqlen - s) for s in range(0, seqlen, PIECE)]
    assert blocks == sizes and ffn == sizes
    assert got.shape == ref.shape == (bsz, seqlen, 101) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(cache.k, ref_cache.k, atol=ATOL, rtol=0)
    torch.testing.assert_close(cache.v, ref_cache.v, atol=ATOL, rtol=0)


def test_last_only_pieces_skip_the_outputs_nobody_reads() -> None:
    model = tiny()
    tokens = torch.randint(0, 101, (2, 3 * PIECE + 1), generator=torch.Generator().manual_seed(1))
    ref, ref_cache = run(model, tokens, 0, ubatch=10**6)
    blocks, ffn = positions_seen(model)
    got, cache = run(model, tokens, 0, ubatch=PIECE, last_only=True)
    assert blocks == [PIECE, PIECE, PIECE, 1]
    assert ffn == [0, 0, 0, 1]  # the last block's feed-forward only for the prompt's last position
    assert got.shape == (2, 1, 101)
    torch.testing.assert_close(got, ref[:, -1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(cache.k, ref_cache.k, atol=ATOL, rtol=0)


def test_pieces_from_a_later_start() -> None:
    model = tiny()
    g = torch.Generator().manual_seed(2)
    prefix, tokens = torch.randint(0, 101, (1, 5), generator=g), torch.randint(0, 101, (1, 2 * PIECE + 3), generator=g)
    ref, ref_cache = run(model, tokens, 5, ubatch=10**6, prefix=prefix)
    got, cache = run(model, tokens, 5, ubatch=PIECE, prefix=prefix)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(cache.k, ref_cache.k, atol=ATOL, rtol=0)
    # And a whole-sequence reference with no cache: the cached pieces give the same last logits.
    full = model(torch.cat([prefix, tokens], 1)).detach()
    torch.testing.assert_close(got, full[:, 5:], atol=ATOL, rtol=0)


def test_paths_that_stay_one_forward() -> None:
    model = tiny()
    tokens = torch.randint(0, 101, (1, 2 * PIECE + 1), generator=torch.Generator().manual_seed(3))
    saved = transformer_module.UBATCH
    transformer_module.UBATCH = PIECE
    try:
        blocks, _ = positions_seen(model)
        cache = KVCache.for_model(model.args, 1, 128, device=CPU)
        model(tokens, 0, cache)  # autograd on: one differentiable call
        with torch.inference_mode():
            model(tokens)  # no cache
            cache = KVCache.for_model(model.args, 1, 128, device=CPU)
            model(tokens, torch.arange(tokens.shape[1])[None], cache)  # positions as a tensor
            model(tokens[:, :PIECE], 0, cache)  # not more than UBATCH
        assert blocks == [2 * PIECE + 1] * 3 + [PIECE]
    finally:
        transformer_module.UBATCH = saved


def test_keep_gives_the_gathered_states() -> None:
    model = tiny()
    tokens = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(4))
    keep = torch.tensor([[8, 2, 2], [0, 5, 7]])
    with torch.inference_mode():
        full = model.hidden_states(tokens, 0, KVCache.for_model(model.args, 2, 16, device=CPU))
        cache = KVCache.for_model(model.args, 2, 16, device=CPU)
        kept = model.hidden_states(tokens, 0, cache, keep=keep)
        assert kept.shape == (2, 3, 64)
        torch.testing.assert_close(kept, full.gather(1, keep[..., None].expand(-1, -1, 64)), atol=ATOL, rtol=0)
        # Every position's keys and values are still cached: the next token's logits are those of a full prefill.
        ref_cache = KVCache.for_model(model.args, 2, 16, device=CPU)
        model(tokens, 0, ref_cache)
        nxt = tokens[:, :1]
        torch.testing.assert_close(model(nxt, 9, cache), model(nxt, 9, ref_cache), atol=ATOL, rtol=0)
        embeddings = model.hidden_states(tokens, 0, layer=0, keep=keep)  # no block: the embeddings gathered
        assert torch.equal(embeddings, model.tok_embeddings(tokens).gather(1, keep[..., None].expand(-1, -1, 64)))


@pytest.mark.parametrize("logprobs", [False, True])
def test_meta_generate_over_pieces(logprobs: bool) -> None:
    model = tiny()
    prompts = [torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (50, 41)]
    kwargs = dict(max_gen_len=6, max_seq_len=128, params=SamplingParams(temperature=0.0), stop_ids=[],
                  device=CPU, logprobs=logprobs, echo=True)
    saved = transformer_module.UBATCH
    try:
        transformer_module.UBATCH = 10**6
        ref_tokens, ref_lp = generate(model, prompts, **kwargs)
        transformer_module.UBATCH = PIECE
        blocks, _ = positions_seen(model)
        tokens, lp = generate(model, prompts, **kwargs)
    finally:
        transformer_module.UBATCH = saved
    assert blocks[:3] == [PIECE, PIECE, 41 - 2 * PIECE]  # the shared prompt length 41, in pieces
    assert tokens == ref_tokens
    if logprobs:
        for row, ref_row in zip(lp, ref_lp):
            torch.testing.assert_close(torch.tensor(row), torch.tensor(ref_row), atol=ATOL, rtol=0)
