"""A prompt chunk's attention over a paged KV cache in place (kernels `kv_attend_blocks`, `KVCache.attend`).

The C++ kernel reads one layer's blocks through each row's block table and runs, per (row, KV head), the
fused step's attention of several rows (qattn_rows.h). References: for every position, `kv_attend` of that
position's queries alone over the same keys copied out contiguous (bit for bit: with 64-position blocks the
tiles are the same, so a chunk's rows are batch-invariant and equal the decode step's attention); float64
attention of the decoded keys, to 1e-5 relative; the model's modules with the kernel and without it (SDPA
on the gathered keys), logits to 1e-4, cached rows the same but for < 0.1% rounded the other way. Also: a row alone and in a batch, bad n and block ids refused with
the kernel's name, and the cases `attend` leaves to the modules. No test asserts on time.
"""

from __future__ import annotations

import math

import pytest
import torch

from llamaforge import kernels
from llamaforge.model import KVCache, ModelArgs, StepInput, Transformer, kv_types
from llamaforge.runtime import DecodeStep

pytestmark = pytest.mark.skipif(kernels.get_extension() is None, reason="the C++ kernels are not available here")
CPU = torch.device("cpu")
TYPES = ("float32", "float16", "bfloat16", "q8_0")
BS, HKV = 64, 2


def paged(kv_type: str, n_blocks: int, hd: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's keys and values (n_blocks, HKV, BS, row) of random rows stored as `kv_type`."""
    g = torch.Generator().manual_seed(seed)
    k = kv_types.encode(torch.randn(n_blocks, HKV, BS, hd, generator=g) * 2, kv_type)
    v = kv_types.encode(torch.randn(n_blocks, HKV, BS, hd, generator=g), kv_type)
    return k, v


def contiguous(layer: torch.Tensor, table: list[int], head: int, n: int) -> torch.Tensor:
    """Rows [0, n) of KV head `head` of a sequence with block table `table`, copied out: (n, row)."""
    return torch.cat([layer[b, head] for b in table])[:n]


@pytest.mark.parametrize("kv_type", TYPES)
@pytest.mark.parametrize("G,hd", [(4, 64), (1, 32), (3, 64)])
def test_each_position_is_the_decode_attention_alone(kv_type, G, hd):
    ext = kernels.get_extension()
    k, v = paged(kv_type, 9, hd, seed=G * 10 + hd)
    tables = torch.tensor([[7, 2, 5, 0], [3, 8, 1, 6]])  # blocks out of order, as a pool hands them out
    starts, T = (130, 5), 20  # row 0 across a block's end, row 1 inside its first block
    n = torch.tensor([[min(s + t + 1, 4 * BS) for t in range(T)] for s in starts])
    q = torch.randn(2, T, HKV * G, hd, generator=torch.Generator().manual_seed(1)) * 2
    out = ext.kv_attend_blocks(q, k, v, tables, n)
    assert out.shape == q.shape and out.dtype == torch.float32
    scale = math.sqrt(hd)
    for b in range(2):
        alone = ext.kv_attend_blocks(q[b : b + 1], k, v, tables[b : b + 1], n[b : b + 1])
        assert torch.equal(alone[0], out[b])  # batch-invariant
        for t in range(T):
            nt = int(n[b, t])
            for g in range(HKV):
                kc, vc = contiguous(k, tables[b].tolist(), g, nt), contiguous(v, tables[b].tolist(), g, nt)
                qg = q[b, t, g * G : (g + 1) * G]
                assert torch.equal(out[b, t, g * G : (g + 1) * G], ext.kv_attend(qg, kc, vc)), (b, t, g)
                if t % 7 == 0:  # and against float64 attention of the decoded rows
                    qq = kv_types.round_query(qg, kv_type).double()
                    kd, vd = kv_types.decode(kc, kv_type, torch.float64), kv_types.decode(vc, kv_type, torch.float64)
                    ref = torch.softmax(qq @ kd.T / scale, dim=-1) @ vd
                    got = out[b, t, g * G : (g + 1) * G].double()
                    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_bad_lengths_and_blocks_are_refused():
    ext = kernels.get_extension()
    k, v = paged("float16", 3, 32, seed=0)
    q = torch.randn(1, 2, 2, 32)
    tables = torch.tensor([[0, 1]])
    with pytest.raises(RuntimeError, match=r"kv_attend_blocks: n\[0, 1\] = 0 is not in \[1, 128\]"):
        ext.kv_attend_blocks(q, k, v, tables, torch.tensor([[1, 0]]))
    with pytest.raises(RuntimeError, match=r"kv_attend_blocks: n\[0, 0\] = 129"):
        ext.kv_attend_blocks(q, k, v, tables, torch.tensor([[129, 1]]))
    with pytest.raises(RuntimeError, match=r"kv_attend_blocks: block 5 is not in \[0, 3\)"):
        ext.kv_attend_blocks(q, k, v, torch.tensor([[0, 5]]), torch.tensor([[70, 71]]))
    with pytest.raises(RuntimeError, match="kv_attend_blocks: q float32"):
        ext.kv_attend_blocks(q.double(), k, v, tables, torch.tensor([[1, 2]]))


def tiny() -> Transformer:
    torch.manual_seed(0)
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, hidden_dim=96, max_seq_len=256)
    return Transformer(args).eval()


@pytest.mark.parametrize("kv_type", ["float32", "float16", "q8_0"])
def test_the_model_with_the_kernel_equals_the_modules(kv_type):
    model = tiny()
    step_maker = DecodeStep(model, fused=True, kv_type=kv_type)
    tokens = torch.randint(0, 101, (2, 150), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        logits = {}
        for kernel in (True, False):
            cache = step_maker.new_cache(2, 256)
            assert cache.block_attention is not None
            if not kernel:
                cache.block_attention = None
            model(tokens[:, :40], 0, cache)  # no mask from position 0: SDPA either way
            # a chunk over the cache, as the engine's (positions) and Meta's later steps (an int start) give them
            chunk = model(tokens[:, 40:100], torch.arange(40, 100)[None].expand(2, -1), cache)
            rest = model(tokens[:, 100:], 100, cache)
            logits[kernel] = (chunk, rest, cache.k.clone(), cache.v.clone())
    for got, ref in zip(logits[True][:2], logits[False][:2]):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # The later layers' keys and values: the same stored rows but where a last-bit difference of their input
    # rounds to the next value of the cache's type (float16 and q8_0: a few in 10^4; float32 within 1e-5).
    for got, ref in zip(logits[True][2:], logits[False][2:]):
        if kv_type == "float32":
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        else:
            assert (got != ref).float().mean().item() < 1e-3


def test_attend_leaves_the_other_cases_to_the_modules():
    model = tiny()
    cache = DecodeStep(model, fused=True).new_cache(1, 64)
    seen = []
    cache.block_attention = lambda *a: seen.append(a) or torch.zeros(0)
    q = k = v = torch.randn(1, 2, 3, 32)
    with torch.inference_mode():
        at0 = StepInput.make(0, 1, 3, device=CPU, cache_len=64)  # no mask: causal from 0
        one = StepInput.make(5, 1, 1, device=CPU, cache_len=64)  # one query: the decode step's
        assert cache.attend(0, at0, q, k, v) is None and cache.attend(0, one, q[:, :, :1], k, v) is None
        later = StepInput.make(5, 1, 3, device=CPU, cache_len=64)
        assert cache.attend(0, later, q.double(), k, v) is None  # not float32
    assert cache.attend(0, later, q, k, v) is None  # autograd on
    assert seen == [] and not cache.k.any()  # nothing called, nothing written
    no_kernel = KVCache.for_model(model.args, 1, 64, device=CPU)
    assert no_kernel.block_attention is None  # the model's own caches have none
