"""The fused C++ decode step (llamaforge.kernels.decode) against the model's own modules.

Reference: the same model with `decode_step = None`, i.e. its PyTorch modules (around the same C++ int8
matmuls for a quantized model, F.linear for a float32 one). The two differ only in the float summation
order of norms, attention, softmax and float matmuls, so on these random tiny models (no outlier
activations that would turn a last-bit difference into a different int8 rounding) logits and cached
keys/values must agree within 1e-4 relative (observed 0 quantized, ~1e-7 float).
A row's result must not depend on the rest of its batch: exact equality. Greedy generation must give
the same tokens. No test asserts on time.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llamaforge import kernels
from llamaforge.generation import SamplingParams, generate
from llamaforge.kernels.decode import enable_fused_decode
from llamaforge.model import ModelArgs, Transformer
from llamaforge.model.kv_cache import KVCache
from llamaforge.quantize import quantize_model_weights

pytestmark = pytest.mark.skipif(kernels.get_extension() is None, reason="the C++ kernels are not available here")

REL_TOL = 1e-4
CPU = torch.device("cpu")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def make_model(scheme: str | None = "q8_0", n_heads: int = 4, n_kv_heads: int = 2, bias: bool = False,
               qkv_bias: bool = False, qk_norm: bool = False) -> Transformer:
    """A random tiny model: GGUF-quantized (`scheme`) or float32 (None), with the fused step enabled.

    qkv_bias / qk_norm give it Qwen2's biases or Qwen3's per-head q/k norms, with random values."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=3, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=90,
                                  hidden_dim=160, max_seq_len=48, qkv_bias=qkv_bias, qk_norm=qk_norm))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-1, 1)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    with torch.no_grad():
        model.output.weight.mul_(8)  # peaked distributions: greedy choices far from ties
        for block in model.layers:  # norm weights that are not all ones, so that their use is checked
            block.attention_norm.weight.uniform_(0.5, 1.5)
            block.ffn_norm.weight.uniform_(0.5, 1.5)
    if bias:
        block = model.layers[1].attention
        block.wq.bias = nn.Parameter(torch.randn(block.wq.out_features))
    if scheme is None:
        assert enable_fused_decode(model)
        return model.eval()
    return quantize_model_weights(model.eval(), scheme)


def eager(model: Transformer):
    clone = copy.copy(model)  # shares modules and weights, runs the modules
    clone.decode_step = None
    return clone


def prefill(model: Transformer, lengths: list[int], slots: list[int], n_slots: int = 4) -> tuple[KVCache, list[int]]:
    cache = KVCache.for_model(model.args, n_slots, 40, dtype=torch.float32, device=CPU)
    g = torch.Generator().manual_seed(1)
    last = []
    with torch.inference_mode():
        for n, slot in zip(lengths, slots):
            tokens = torch.randint(0, 90, (1, n), generator=g)
            logits = model(tokens, torch.arange(n), cache, slots=torch.tensor([slot]), kv_len=n)
            last.append(int(logits[0, -1].argmax()))
    return cache, last


@pytest.mark.parametrize("scheme", ["q8_0", "q4_1", "q5_0", None])
def test_ragged_slots_match_the_modules(scheme):
    """Rows at different positions in shuffled slots, kv_len as the server passes it, several steps."""
    model = make_model(scheme)
    reference = eager(model)
    lengths, slots = [5, 11, 2], [2, 0, 3]
    cache, last = prefill(model, lengths, slots)
    ref_cache = copy.deepcopy(cache)
    pos = torch.tensor(lengths)
    tokens = torch.tensor(last).view(3, 1)
    with torch.inference_mode():
        for _ in range(4):
            kv_len = int(pos.max()) + 1
            args = (tokens, pos.view(3, 1))
            kw = dict(slots=torch.tensor(slots), kv_len=kv_len, last_only=True)
            ours = model(*args, cache, **kw)
            ref = reference(*args, ref_cache, **kw)
            assert rel(ours, ref) < REL_TOL
            assert rel(cache.k, ref_cache.k) < REL_TOL and rel(cache.v, ref_cache.v) < REL_TOL
            tokens, pos = ref[:, -1].argmax(-1).view(3, 1), pos + 1
    assert model.decode_step._decoder is not None  # the fused path ran


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 1)])
def test_shared_start_matches_the_modules(n_heads, n_kv_heads):
    """Meta's lock-step decode (an int start for every row), multi-head and multi-query attention."""
    model = make_model("q8_0", n_heads, n_kv_heads)
    reference = eager(model)
    cache = KVCache.for_model(model.args, 2, 40, dtype=torch.float32, device=CPU)
    ref_cache = copy.deepcopy(cache)
    prompt = torch.randint(0, 90, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        model(prompt, 0, cache)
        reference(prompt, 0, ref_cache)
        step = prompt[:, -1:]
        for start in range(6, 10):
            ours, ref = model(step, start, cache), reference(step, start, ref_cache)
            assert rel(ours, ref) < REL_TOL
            step = ref[:, -1].argmax(-1, keepdim=True)


@pytest.mark.parametrize("scheme", ["q8_0", None])
def test_bias_is_used(scheme):
    model = make_model(scheme, bias=True)
    cache, last = prefill(model, [4], [0], n_slots=1)
    ref_cache = copy.deepcopy(cache)
    with torch.inference_mode():
        ours = model(torch.tensor([[last[0]]]), 4, cache)
        ref = eager(model)(torch.tensor([[last[0]]]), 4, ref_cache)
    assert rel(ours, ref) < REL_TOL


@pytest.mark.parametrize("scheme", ["q8_0", None])
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_blocks_match_the_modules(arch, scheme):
    """Qwen2's q/k/v biases and Qwen3's per-head q/k norms inside the fused step, ragged rows, several steps."""
    model = make_model(scheme, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3")
    reference = eager(model)
    lengths, slots = [5, 9], [1, 0]
    cache, last = prefill(model, lengths, slots, n_slots=2)
    ref_cache = copy.deepcopy(cache)
    pos, tokens = torch.tensor(lengths), torch.tensor(last).view(2, 1)
    with torch.inference_mode():
        for _ in range(3):
            kw = dict(slots=torch.tensor(slots), kv_len=int(pos.max()) + 1)
            ours = model(tokens, pos.view(2, 1), cache, **kw)
            ref = reference(tokens, pos.view(2, 1), ref_cache, **kw)
            assert rel(ours, ref) < REL_TOL
            assert rel(cache.k, ref_cache.k) < REL_TOL
            tokens, pos = ref[:, -1].argmax(-1).view(2, 1), pos + 1
    assert model.decode_step._decoder is not None  # the fused path ran


def test_a_row_does_not_depend_on_its_batch():
    model = make_model("q4_1")
    lengths, slots = [5, 9, 3], [0, 1, 2]
    cache, last = prefill(model, lengths, slots)
    alone_cache = copy.deepcopy(cache)
    with torch.inference_mode():
        batch = model(torch.tensor(last).view(3, 1), torch.tensor(lengths).view(3, 1), cache,
                      slots=torch.tensor(slots), kv_len=12)
        alone = model(torch.tensor([[last[1]]]), torch.tensor([[lengths[1]]]), alone_cache,
                      slots=torch.tensor([1]), kv_len=12)
    assert torch.equal(batch[1], alone[0])


@pytest.mark.parametrize("scheme", ["q8_0", None])
def test_greedy_generation_is_unchanged(scheme):
    model = make_model(scheme)
    prompts = [[1, 5, 9, 13, 20, 7], [1, 3], [1, 40, 41, 42]]

    def run(m):
        return generate(m, prompts, max_gen_len=10, max_seq_len=32, params=SamplingParams(temperature=0.0),
                        stop_ids=(), device=CPU, logprobs=True)

    ours, ref = run(model), run(eager(model))
    assert ours[0] == ref[0]
    for a, b in zip(ours[1], ref[1]):
        assert a == pytest.approx(b, abs=1e-4)


def test_steps_aside_where_it_does_not_apply():
    """Hooks, swapped modules, autograd and other dtypes run the modules (decode_step returns None)."""
    model = make_model("q8_0")
    cache, last = prefill(model, [4], [0], n_slots=1)
    tokens = torch.tensor([[last[0]]])

    def fused():
        with torch.inference_mode():
            return model.decode_step(model, tokens, 4, cache, None, None)

    assert fused() is not None
    handle = model.layers[0].attention.wo.register_forward_hook(lambda *a: None)
    assert fused() is None
    handle.remove()
    assert fused() is not None
    with torch.enable_grad():
        assert model.decode_step(model, tokens, 4, cache, None, None) is None
    half_cache = KVCache.for_model(model.args, 1, 40, dtype=torch.bfloat16, device=CPU)
    with torch.inference_mode():
        assert model.decode_step(model, tokens, 4, half_cache, None, None) is None
    # A projection swapped for another module (as LoRA does): the modules run, and give the same
    # result as before the swap when the new module computes the same thing.
    wq = model.layers[2].attention.wq
    model.layers[2].attention.wq = nn.Sequential(wq)
    assert fused() is None
    model.layers[2].attention.wq = wq
    assert fused() is not None


def test_rebuilds_after_weights_change():
    model = make_model("q8_0")
    cache, last = prefill(model, [4], [0], n_slots=1)
    ref_cache = copy.deepcopy(cache)
    with torch.inference_mode():
        model(torch.tensor([[last[0]]]), 4, copy.deepcopy(cache))
        first = model.decode_step._decoder
        model.layers[1].ffn_norm.weight = nn.Parameter(torch.full((64,), 2.0))  # a new Parameter object
        ours = model(torch.tensor([[last[0]]]), 4, cache)
        ref = eager(model)(torch.tensor([[last[0]]]), 4, ref_cache)
    assert model.decode_step._decoder is not first
    assert rel(ours, ref) < REL_TOL


def test_deepcopy_keeps_a_working_fast_path():
    model = make_model("q8_0")
    cache, last = prefill(model, [4], [0], n_slots=1)
    with torch.inference_mode():
        model(torch.tensor([[last[0]]]), 4, copy.deepcopy(cache))
    twin = copy.deepcopy(model)
    with torch.inference_mode():
        a = model(torch.tensor([[last[0]]]), 4, copy.deepcopy(cache))
        b = twin(torch.tensor([[last[0]]]), 4, copy.deepcopy(cache))
    assert torch.equal(a, b)
    assert twin.decode_step._decoder is not None and twin.decode_step._decoder is not model.decode_step._decoder


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_16bit_gguf_stays_16bit_and_decodes_as_float32(tiny_checkpoints, tmp_path, dtype):
    """A 16-bit GGUF on the CPU keeps its weights 16-bit (weight-only layers, float32 activations) and gives
    the tokens of the same file dequantized to float32 (the same weight values: only summation order differs)."""
    from llamaforge import Llama, checkpoints
    from llamaforge.quantize import QuantizedLinear

    t = tiny_checkpoints
    path = checkpoints.save_gguf(t.args, t.state_dict, tmp_path / f"tiny-{dtype}.gguf", dtype=dtype,
                                 tokenizer_metadata=checkpoints.load(t.gguf).gguf_metadata)
    kept = Llama.build(path, max_seq_len=64, max_batch_size=2, device="cpu")
    wq = kept.model.layers[0].attention.wq
    assert isinstance(wq, QuantizedLinear) and wq.qtype == dtype.upper()
    assert kept.model.norm.weight.dtype == torch.float32
    ref = Llama.build(path, max_seq_len=64, max_batch_size=2, device="cpu", dtype="float32")
    prompts = [[1, 5, 9, 13, 20, 7], [1, 3]]
    ours = kept.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    theirs = ref.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    assert ours[0] == theirs[0]
    for a, b in zip(ours[1], theirs[1]):
        assert a == pytest.approx(b, abs=1e-4)
    assert kept.model.decode_step._decoder is not None  # the one-token steps ran fused


def test_rebuilds_after_data_is_swapped_in_place():
    """`param.data = ...` keeps the Parameter object but gives it new storage: the decoder must notice."""
    model = make_model(None)
    cache, last = prefill(model, [4], [0], n_slots=1)
    ref_cache = copy.deepcopy(cache)
    with torch.inference_mode():
        model(torch.tensor([[last[0]]]), 4, copy.deepcopy(cache))
    first = model.decode_step._decoder
    with torch.no_grad():
        model.layers[0].attention.wo.weight.data = torch.randn(64, 64)
    with torch.inference_mode():
        ours = model(torch.tensor([[last[0]]]), 4, cache)
        ref = eager(model)(torch.tensor([[last[0]]]), 4, ref_cache)
    assert model.decode_step._decoder is not first
    assert rel(ours, ref) < REL_TOL
