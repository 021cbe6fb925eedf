"""The fused decode step's attention (kernels/qattn.h: grouped query heads, tiles of 64 keys, online softmax)
against the model's own modules (float32 matmul, softmax, matmul as Meta computes it).

Contexts longer than one tile (64 keys) with a partial last tile, every group size G = n_heads / n_kv_heads
the kernel has a code path for (1, 2, 3, 4, 8, and 9 = 8 + 1), head dims that are and are not multiples of 8
and 32. The two compute the same maths in another summation order (and exp256 against expf), so logits and
cached keys/values agree within 1e-4 relative (observed ~1e-6). A row's result does not depend on its batch:
exact. No test asserts on time.
"""

from __future__ import annotations

import copy

import pytest
import torch

from llamaforge import kernels
from llamaforge.model import ModelArgs, StepInput, Transformer
from llamaforge.model.kv_cache import KVCache
from llamaforge.runtime import DecodeStep

pytestmark = pytest.mark.skipif(kernels.get_extension() is None, reason="the C++ kernels are not available here")
CPU = torch.device("cpu")
REL_TOL = 1e-4
CTX = 200


def model_for(n_heads: int, n_kv_heads: int, head_dim: int) -> Transformer:
    torch.manual_seed(n_heads * 100 + n_kv_heads * 10 + head_dim)
    model = Transformer(ModelArgs(dim=n_heads * head_dim, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                  vocab_size=50, hidden_dim=96, max_seq_len=CTX))
    with torch.no_grad():  # sharper attention than the default init: softmax maxima matter
        for block in model.layers:
            block.attention.wq.weight.mul_(4)
            block.attention.wk.weight.mul_(4)
    return model.eval()


def fused(model: Transformer) -> DecodeStep:
    step = DecodeStep(model, fused=True)
    assert step.fused is not None
    return step


@pytest.mark.parametrize(
    "n_heads,n_kv_heads,head_dim",
    [(4, 4, 16), (4, 2, 16), (6, 2, 12), (4, 1, 64), (8, 1, 8), (9, 1, 40), (3, 1, 32)],
)
def test_long_context_matches_the_modules(n_heads, n_kv_heads, head_dim):
    model = model_for(n_heads, n_kv_heads, head_dim)
    decode = fused(model)
    cache = KVCache.for_model(model.args, 2, CTX, dtype=torch.float32, device=CPU)
    ref_cache = copy.deepcopy(cache)
    prompt = torch.randint(0, 50, (2, 150), generator=torch.Generator().manual_seed(5))  # 2 full tiles + 22
    with torch.inference_mode():
        model(prompt, 0, cache)
        model(prompt, 0, ref_cache)
        step = prompt[:, -1:]
        for start in (150, 151, 192):  # 151 keys, 152, and (after a skip) a last tile of 1
            at = StepInput.make(start, 2, 1, device=CPU, cache_len=CTX)
            ours, ref = decode(step, at, cache), model(step, start, ref_cache, last_only=True)  # fused, modules
            assert decode.ran_fused
            assert ((ours - ref).norm() / ref.norm()).item() < REL_TOL
            step = ref[:, -1].argmax(-1, keepdim=True)
        # the next layer's input depended on this layer's attention: compare the cached keys too
        assert ((cache.k - ref_cache.k).norm() / ref_cache.k.norm()).item() < REL_TOL


def test_rows_at_different_lengths_do_not_depend_on_each_other():
    model = model_for(4, 2, 16)
    decode = fused(model)
    cache = KVCache.for_model(model.args, 3, CTX, dtype=torch.float32, device=CPU)
    g = torch.Generator().manual_seed(6)
    with torch.inference_mode():
        for slot, n in enumerate((70, 129, 3)):
            model(torch.randint(0, 50, (1, n), generator=g), 0, cache, slots=torch.tensor([slot]))
        tokens, pos = torch.tensor([[7], [8], [9]]), torch.tensor([[70], [129], [3]])
        alone_cache = copy.deepcopy(cache)
        batch = decode(tokens, StepInput.make(pos, 3, 1, device=CPU, cache_len=CTX, slots=torch.arange(3), kv_len=CTX),
                       cache)
        for r in range(3):
            alone = decode(tokens[r : r + 1], StepInput.make(pos[r : r + 1], 1, 1, device=CPU, cache_len=CTX,
                                                             slots=torch.tensor([r]), kv_len=CTX), alone_cache)
            assert torch.equal(alone[0], batch[r])
