"""A model runs the same on an AVX2-only CPU as on an AVX-512 one, bit for bit (kernels/loader.py's
LLAMAFORGE_X8_TILES=avx2, the kernels' `use_vnni` and `use_avx512_gemm` switches).

On an AVX-512 CPU the C++ kernels take AVX-512 paths in three places: the VNNI x8 tiles (quantized weights),
the AVX-512 16-bit GEMM (F16 / BF16 prefill), and vdpbf16ps for BF16 weights (prefill and decode). Each has an
AVX2 twin that computes the same integer sums or the same float operations (qx8_tiles.h, qgemm.h), so a
whole model's logits, prefill and fused decode step alike, must be EQUAL (torch.equal) with them all off: what
an AVX2-only CPU (Zen 3, Haswell ..) computes. On a CPU without AVX-512 both runs are the AVX2 one. The files
are llama.cpp's type mixes (the K-quant ones with 256-wide rows), quantized by the project's reference
quantizers; prompts of 12 rows (the prefill tiles and GEMM) and decode steps of 1 and 3 rows.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llamaforge import Llama
from llamaforge.kernels import get_extension
from llamaforge.model import StepInput
from tests.conftest import block_ggufs

EXT = get_extension()
pytestmark = pytest.mark.skipif(EXT is None, reason="the C++ kernels are not available here")

TYPES = ["q4_0", "q8_0", "q4_k_m", "q6_k", "f16", "bf16"]  # what save_gguf writes (Q4_1 / Q5_K: test_gemv_kernels)


@pytest.fixture(scope="module")
def files(tiny_checkpoints, tmp_path_factory):
    return block_ggufs(tiny_checkpoints, tmp_path_factory.mktemp("isa"), TYPES)[0]


def run(llm: Llama) -> list[torch.Tensor]:
    """Prefill logits of a 12-token prompt, then fused decode-step logits at 1 and 3 rows."""
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(3, llm.model.args.vocab_size, (3, 12), generator=g)
    out = []
    with torch.inference_mode():
        for rows in (1, 3):
            cache = llm.decode_step.new_cache(rows, 16)
            out.append(llm.model(prompt[:rows], 0, cache))  # (rows, 12, vocab)
            nxt = out[-1][:, -1].argmax(-1).view(rows, 1)
            step = StepInput.make(12, rows, 1, device=torch.device("cpu"), cache_len=cache.max_seq_len)
            out.append(llm.decode_step(nxt, step, cache))
    return out


def switches(on: bool) -> tuple[bool, bool, bool]:
    """The AVX-512 paths on (where the CPU has them) or off; returns what they were."""
    return EXT.use_vnni(on), EXT.use_avx512_gemm(on), EXT.use_bf16dot(on)


@pytest.mark.parametrize("qtype", TYPES)
def test_avx2_paths_give_the_default_bits(files, qtype):
    llm = Llama.build(files[qtype], max_seq_len=32, max_batch_size=3, device="cpu", progress=False)
    assert llm.decode_step.fused is not None
    was = switches(True)
    try:
        wide = run(llm)
        switches(False)
        assert not EXT.use_vnni() and not EXT.use_avx512_gemm() and not EXT.use_bf16dot()
        narrow = run(llm)
    finally:
        EXT.use_vnni(was[0])
        EXT.use_avx512_gemm(was[1])
        EXT.use_bf16dot(was[2])
    for i, (a, b) in enumerate(zip(wide, narrow)):
        assert torch.equal(a, b), (qtype, i, (a - b).abs().max().item())


def test_the_environment_switch_turns_every_avx512_path_off():
    code = ("from llamaforge import kernels; e = kernels.get_extension(); "
            "print(e.use_vnni(), e.use_avx512_gemm(), e.use_bf16dot())")
    env = dict(os.environ, LLAMAFORGE_X8_TILES="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False", "False", "False"]
