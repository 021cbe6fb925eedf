"""The decode matmul's thread split changes no bit: threads taking guided chunks from a shared counter
(qmatmul.cpp matmul_many, `decode_chunk_bytes`), down to one row group per chunk, give exactly the numbers of
the static split and of one thread, for every weight layout the decode step reads, and so does the fused decode
step of a tiny model. Run at 2 threads with the per-thread minimum at 1 byte, so that even these small weights
are split. No test asserts on time."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from llamaforge import kernels
from llamaforge.model import KVCache, ModelArgs, StepInput, Transformer
from llamaforge.quantize import quantize_model_weights
from llamaforge.runtime import DecodeStep

EXT = kernels.get_extension()
pytestmark = pytest.mark.skipif(EXT is None, reason="the C++ kernels are not available here")

CPU = torch.device("cpu")


@contextlib.contextmanager
def split(chunk_bytes: int, threads: int = 2):
    """`threads` torch threads, every matmul split (min_bytes_per_thread 1), chunks of `chunk_bytes` (0: static)."""
    was = torch.get_num_threads(), EXT.min_bytes_per_thread(1), EXT.decode_chunk_bytes(chunk_bytes)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(was[0])
        EXT.min_bytes_per_thread(was[1])
        EXT.decode_chunk_bytes(was[2])


def raw_weight(qtype: str, n: int, k: int, seed: int) -> torch.Tensor:
    """GGUF bytes (n, bytes per row) of `qtype` with random quants and small finite scales (or a float tensor)."""
    rng = np.random.default_rng(seed)
    if qtype in ("F16", "BF16", "F32"):
        w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32))
        return w.to({"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[qtype])
    info = kernels.qtype_info(qtype)
    nb = k // info.block
    raw = rng.integers(0, 256, (n, nb, info.bytes), dtype=np.uint8)
    for off in {"Q6_K": [208], "Q4_K": [0, 2], "Q5_K": [0, 2]}.get(qtype, [0]):
        raw[:, :, off: off + 2] = rng.uniform(1e-3, 1e-2, (n, nb, 1)).astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(n, nb * info.bytes))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "F16", "BF16", "F32"])
def test_guided_chunks_give_the_static_splits_numbers(qtype):
    n, k = 203, 512  # 26 groups of 8 rows, the last of 3; 203 single rows for the GGUF layout and float weights
    raw = raw_weight(qtype, n, k, seed=5)
    if raw.dtype == torch.uint8:
        w, layout = kernels.repack(raw, qtype, n, k)
    else:
        w, layout = raw, "gguf"
    lid = kernels.LAYOUT_IDS[layout]
    qt = 0 if qtype == "F32" else kernels.qtype_info(qtype).type_id  # GGML type 0: float32 (kernels/qcommon.h)
    x = torch.randn(8, k, generator=torch.Generator().manual_seed(1))
    for m in (1, 2, 3, 5, 8):  # decode row counts (M < 9 takes the chunked split)
        with split(0, threads=1):
            want = EXT.qlinear(x[:m], w, qt, n, k, None, 0, lid)
        for chunk in (0, 1, 3000, 64 << 10):  # static halves; chunks of one unit, a few, the default size
            with split(chunk):
                got = EXT.qlinear(x[:m], w, qt, n, k, None, 0, lid)
            assert torch.equal(got, want), (qtype, m, chunk)


@pytest.mark.parametrize("scheme", ["q4_0", "q8_0", None])
def test_fused_step_is_the_same_at_every_split(scheme):
    torch.manual_seed(0)
    # hidden_dim 4352: the SwiGLU (over threads from 4096 values) is split too
    model = Transformer(ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=4352,
                                  max_seq_len=32)).eval()
    if scheme is not None:
        model = quantize_model_weights(model, scheme)
    step = DecodeStep(model, fused=True)
    assert step.fused is not None
    tokens = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(2))
    outs = []
    for chunk, threads in ((0, 1), (0, 2), (1, 2), (64 << 10, 2)):
        cache = KVCache.for_model(model.args, 1, 16, dtype=torch.float32, device=CPU)
        with split(chunk, threads), torch.inference_mode():
            logits = []
            for i in range(tokens.shape[1]):
                pos = StepInput.make(i, 1, 1, device=CPU, cache_len=cache.max_seq_len)
                logits.append(step(tokens[:, i: i + 1], pos, cache))
        assert step.ran_fused
        outs.append(torch.cat(logits, 1))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
