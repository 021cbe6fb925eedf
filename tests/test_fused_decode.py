"""The fused C++ decode step (llamaforge.runtime.fused, through a fused `DecodeStep`) against the model's modules.

Reference: the same model's `forward`, i.e. its PyTorch modules (around the same C++ int8
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
from llamaforge.model import KVCache, ModelArgs, StepInput, Transformer
from llamaforge.quantize import quantize_model_weights
from llamaforge.runtime import DecodeStep

pytestmark = pytest.mark.skipif(kernels.get_extension() is None, reason="the C++ kernels are not available here")

REL_TOL = 1e-4
CPU = torch.device("cpu")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def make_model(scheme: str | None = "q8_0", n_heads: int = 4, n_kv_heads: int = 2, bias: bool = False,
               qkv_bias: bool = False, qk_norm: bool = False, hidden_dim: int = 160) -> Transformer:
    """A random tiny model: GGUF-quantized (`scheme`) or float32 (None).

    qkv_bias / qk_norm give it Qwen2's biases or Qwen3's per-head q/k norms, with random values."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=3, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=90,
                                  hidden_dim=hidden_dim, max_seq_len=48, qkv_bias=qkv_bias, qk_norm=qk_norm))
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
        return model.eval()
    return quantize_model_weights(model.eval(), scheme)


def fused(model: Transformer) -> DecodeStep:
    step = DecodeStep(model, fused=True)
    assert step.fused is not None
    return step


def at(input_pos, cache: KVCache, bsz: int = 1, slots=None, kv_len=None) -> StepInput:
    """The StepInput of (bsz, 1) tokens at `input_pos` in `cache`."""
    return StepInput.make(input_pos, bsz, 1, device=CPU, cache_len=cache.max_seq_len,
                          slots=None if slots is None else torch.tensor(slots), kv_len=kv_len)


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
    step = fused(model)
    lengths, slots = [5, 11, 2], [2, 0, 3]
    cache, last = prefill(model, lengths, slots)
    ref_cache = copy.deepcopy(cache)
    pos = torch.tensor(lengths)
    tokens = torch.tensor(last).view(3, 1)
    with torch.inference_mode():
        for _ in range(4):
            kv_len = int(pos.max()) + 1
            ours = step(tokens, at(pos.view(3, 1), cache, 3, slots, kv_len), cache)
            ref = model(tokens, pos.view(3, 1), ref_cache, slots=torch.tensor(slots), kv_len=kv_len, last_only=True)
            assert step.ran_fused
            assert rel(ours, ref) < REL_TOL
            assert rel(cache.k, ref_cache.k) < REL_TOL and rel(cache.v, ref_cache.v) < REL_TOL
            tokens, pos = ref[:, -1].argmax(-1).view(3, 1), pos + 1


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 1)])
def test_shared_start_matches_the_modules(n_heads, n_kv_heads):
    """Meta's lock-step decode (an int start for every row), multi-head and multi-query attention."""
    model = make_model("q8_0", n_heads, n_kv_heads)
    step = fused(model)
    cache = KVCache.for_model(model.args, 2, 40, dtype=torch.float32, device=CPU)
    ref_cache = copy.deepcopy(cache)
    prompt = torch.randint(0, 90, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        model(prompt, 0, cache)
        model(prompt, 0, ref_cache)
        tokens = prompt[:, -1:]
        for start in range(6, 10):
            ours, ref = step(tokens, at(start, cache, 2), cache), model(tokens, start, ref_cache)
            assert step.ran_fused
            assert rel(ours, ref) < REL_TOL
            tokens = ref[:, -1].argmax(-1, keepdim=True)


@pytest.mark.parametrize("scheme", ["q8_0", None])
def test_bias_is_used(scheme):
    model = make_model(scheme, bias=True)
    cache, last = prefill(model, [4], [0], n_slots=1)
    ref_cache = copy.deepcopy(cache)
    step = fused(model)
    with torch.inference_mode():
        ours = step(torch.tensor([[last[0]]]), at(4, cache), cache)
        ref = model(torch.tensor([[last[0]]]), 4, ref_cache)
    assert step.ran_fused
    assert rel(ours, ref) < REL_TOL


@pytest.mark.parametrize("scheme", ["q8_0", None])
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_blocks_match_the_modules(arch, scheme):
    """Qwen2's q/k/v biases and Qwen3's per-head q/k norms inside the fused step, ragged rows, several steps."""
    model = make_model(scheme, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3")
    step = fused(model)
    lengths, slots = [5, 9], [1, 0]
    cache, last = prefill(model, lengths, slots, n_slots=2)
    ref_cache = copy.deepcopy(cache)
    pos, tokens = torch.tensor(lengths), torch.tensor(last).view(2, 1)
    with torch.inference_mode():
        for _ in range(3):
            kv_len = int(pos.max()) + 1
            ours = step(tokens, at(pos.view(2, 1), cache, 2, slots, kv_len), cache)
            ref = model(tokens, pos.view(2, 1), ref_cache, slots=torch.tensor(slots), kv_len=kv_len, last_only=True)
            assert step.ran_fused  # the fused path ran
            assert rel(ours, ref) < REL_TOL
            assert rel(cache.k, ref_cache.k) < REL_TOL
            tokens, pos = ref[:, -1].argmax(-1).view(2, 1), pos + 1


def test_a_row_does_not_depend_on_its_batch():
    model = make_model("q4_1")
    lengths, slots = [5, 9, 3], [0, 1, 2]
    cache, last = prefill(model, lengths, slots)
    alone_cache = copy.deepcopy(cache)
    step = fused(model)
    with torch.inference_mode():
        batch = step(torch.tensor(last).view(3, 1), at(torch.tensor(lengths).view(3, 1), cache, 3, slots, 12), cache)
        alone = step(torch.tensor([[last[1]]]), at(torch.tensor([[lengths[1]]]), alone_cache, 1, [1], 12), alone_cache)
    assert step.ran_fused
    assert torch.equal(batch[1], alone[0])


def test_a_float32_row_does_not_depend_on_its_batch():
    # 11 rows of float32 weights: the 1 x 8 tile, then 1 x 3 (qmatmul.cpp float_rows); each row alone is a 1 x 1
    model = make_model(None)
    lengths = [5, 9, 3, 7, 2, 11, 4, 6, 8, 10, 1]
    slots = list(range(len(lengths)))
    cache, last = prefill(model, lengths, slots, n_slots=len(lengths))
    step = fused(model)
    with torch.inference_mode():
        alone = []
        for b in slots:
            c = copy.deepcopy(cache)
            alone.append(step(torch.tensor([[last[b]]]), at(torch.tensor([[lengths[b]]]), c, 1, [b], 12), c)[0])
        batch = step(torch.tensor(last).view(-1, 1), at(torch.tensor(lengths).view(-1, 1), cache, len(slots), slots, 12),
                     cache)
    assert step.ran_fused
    for b in slots:
        assert torch.equal(batch[b], alone[b]), b


def test_swiglu_split_over_threads_keeps_each_row_its_own():
    """The step's SwiGLU runs over the batch's B * hidden elements split among the threads at points that are
    neither row starts nor multiples of 8 (11 rows of 390 here, two threads); its vector code covers each share's
    last elements too, so every row is still bit for bit its one-token step, and matches the modules' F.silu."""
    model = make_model(None, hidden_dim=390)
    lengths = [5, 9, 3, 7, 2, 11, 4, 6, 8, 10, 1]
    slots = list(range(len(lengths)))
    cache, last = prefill(model, lengths, slots, n_slots=len(lengths))
    ref_cache = copy.deepcopy(cache)
    step = fused(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            alone = []
            for b in slots:
                c = copy.deepcopy(cache)
                alone.append(step(torch.tensor([[last[b]]]), at(torch.tensor([[lengths[b]]]), c, 1, [b], 12), c)[0])
            pos = torch.tensor(lengths).view(-1, 1)
            batch = step(torch.tensor(last).view(-1, 1), at(pos, cache, len(slots), slots, 12), cache)
            ref = model(torch.tensor(last).view(-1, 1), pos, ref_cache, slots=torch.tensor(slots), kv_len=12,
                        last_only=True)
    finally:
        torch.set_num_threads(threads)
    assert step.ran_fused
    for b in slots:
        assert torch.equal(batch[b], alone[b]), b
    assert rel(batch, ref) < REL_TOL


def test_rows_of_several_sequences_in_one_batch_are_their_one_token_steps():
    """Runs of rows of one slot attend together (kernels/qattn_rows.h, grouped by qdecode.cpp's row_groups): a
    batch of slot 0 at 20, 21, 22, slot 1 at 14, 15, then slot 0 again at 23 gives each row what one-token steps
    of its slot, in position order, give."""
    model = make_model("q4_1")
    cache, last = prefill(model, [20, 14], [0, 1])
    alone_cache = copy.deepcopy(cache)
    step = fused(model)
    tokens, pos, slots = [last[0], 5, 17, last[1], 33, 8], [20, 21, 22, 14, 15, 23], [0, 0, 0, 1, 1, 0]
    with torch.inference_mode():
        batch = step(torch.tensor(tokens).view(-1, 1), at(torch.tensor(pos).view(-1, 1), cache, 6, slots, 40), cache)
        order = sorted(range(6), key=lambda b: (slots[b], pos[b]))
        alone = {b: step(torch.tensor([[tokens[b]]]), at(torch.tensor([[pos[b]]]), alone_cache, 1, [slots[b]], 40),
                         alone_cache)[0] for b in order}
    assert step.ran_fused
    for b in range(6):
        assert torch.equal(batch[b], alone[b]), f"row {b}: slot {slots[b]} at {pos[b]}"


@pytest.mark.parametrize("scheme", ["q8_0", None])
def test_greedy_generation_is_unchanged(scheme):
    model = make_model(scheme)
    prompts = [[1, 5, 9, 13, 20, 7], [1, 3], [1, 40, 41, 42]]

    def run(decode_step):
        return generate(model, prompts, max_gen_len=10, max_seq_len=32, params=SamplingParams(temperature=0.0),
                        stop_ids=(), device=CPU, logprobs=True, decode_step=decode_step)

    step = fused(model)
    ours, ref = run(step), run(DecodeStep(model))
    assert step.ran_fused
    assert ours[0] == ref[0]
    for a, b in zip(ours[1], ref[1]):
        assert a == pytest.approx(b, abs=1e-4)


def test_steps_aside_where_it_does_not_apply():
    """Hooks, swapped modules, autograd and other dtypes run the modules (the fused part returns None, and
    the DecodeStep's result is then the modules' own)."""
    model = make_model("q8_0")
    cache, last = prefill(model, [4], [0], n_slots=1)
    tokens = torch.tensor([[last[0]]])
    step = fused(model)

    def run(c=cache):
        with torch.inference_mode():
            return step.fused(model, tokens, at(4, c), c)

    assert run() is not None
    handle = model.layers[0].attention.wo.register_forward_hook(lambda *a: None)
    assert run() is None
    with torch.inference_mode():  # the step as the loop calls it: the modules' numbers exactly
        ref_cache = copy.deepcopy(cache)
        assert torch.equal(step(tokens, at(4, cache), copy.deepcopy(cache)), model(tokens, 4, ref_cache))
    handle.remove()
    assert run() is not None
    with torch.enable_grad():
        assert step.fused(model, tokens, at(4, cache), cache) is None
    # every KV element type runs fused (tests/test_kv_types.py), a bfloat16 cache too
    assert run(KVCache.for_model(model.args, 1, 40, dtype=torch.bfloat16, device=CPU)) is not None
    # A projection swapped for another module (as LoRA does): the modules run, and give the same
    # result as before the swap when the new module computes the same thing.
    wq = model.layers[2].attention.wq
    model.layers[2].attention.wq = nn.Sequential(wq)
    assert run() is None
    model.layers[2].attention.wq = wq
    assert run() is not None
    assert DecodeStep(model).fused is None  # a plain DecodeStep is the modules alone


def test_rebuilds_after_weights_change():
    model = make_model("q8_0")
    cache, last = prefill(model, [4], [0], n_slots=1)
    ref_cache = copy.deepcopy(cache)
    step = fused(model)
    tokens = torch.tensor([[last[0]]])
    with torch.inference_mode():
        step(tokens, at(4, cache), copy.deepcopy(cache))
        first = step.fused._decoder
        model.layers[1].ffn_norm.weight = nn.Parameter(torch.full((64,), 2.0))  # a new Parameter object
        ours = step(tokens, at(4, cache), cache)
        ref = model(tokens, 4, ref_cache)
    assert step.ran_fused and step.fused._decoder is not first
    assert rel(ours, ref) < REL_TOL


def test_deepcopy_keeps_a_working_fast_path():
    model = make_model("q8_0")
    cache, last = prefill(model, [4], [0], n_slots=1)
    step = fused(model)
    tokens = torch.tensor([[last[0]]])
    with torch.inference_mode():
        step(tokens, at(4, cache), copy.deepcopy(cache))
    twin = copy.deepcopy(step)  # a copy of the model with its own step
    assert twin.model is not model
    with torch.inference_mode():
        a = step(tokens, at(4, cache), copy.deepcopy(cache))
        b = twin(tokens, at(4, cache), copy.deepcopy(cache))
    assert torch.equal(a, b)
    assert twin.ran_fused and twin.fused._decoder is not step.fused._decoder


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_16bit_gguf_stays_16bit_and_decodes_as_float32(tiny_checkpoints, tmp_path, dtype):
    """A 16-bit GGUF on the CPU keeps its weights 16-bit (weight-only layers, float32 activations, rounded to
    bf16 before each matmul of a BF16 weight; llama.cpp's f16 KV cache) and gives the tokens of the same file
    dequantized to float32 over the same cache type (the same weight values, the same rounding of a BF16 model's matmul inputs: only summation order differs,
    which for BF16 can move an activation across a bf16 rounding boundary, 2^-9 relative: observed 8e-4)."""
    from llamaforge import Llama, checkpoints
    from llamaforge.quantize import QuantizedLinear

    t = tiny_checkpoints
    path = checkpoints.save_gguf(t.args, t.state_dict, tmp_path / f"tiny-{dtype}.gguf", dtype=dtype,
                                 tokenizer_metadata=checkpoints.load(t.gguf).gguf_metadata)
    kept = Llama.build(path, max_seq_len=64, max_batch_size=2, device="cpu")
    wq = kept.model.layers[0].attention.wq
    assert isinstance(wq, QuantizedLinear) and wq.qtype == dtype.upper()
    assert kept.model.norm.weight.dtype == torch.float32
    assert kept.kv_type == "float16"
    ref = Llama.build(path, max_seq_len=64, max_batch_size=2, device="cpu", dtype="float32", kv_type="float16")
    if dtype == "bf16":
        for m in ref.model.modules():
            if isinstance(m, nn.Linear):
                m.register_forward_pre_hook(lambda _m, args: (args[0].bfloat16().float(),))
    prompts = [[1, 5, 9, 13, 20, 7], [1, 3]]
    ours = kept.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    theirs = ref.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    assert ours[0] == theirs[0]
    for a, b in zip(ours[1], theirs[1]):
        assert a == pytest.approx(b, abs=1e-4 if dtype == "f16" else 2e-3)
    assert kept.decode_step.ran_fused  # the one-token steps ran fused


def test_rebuilds_after_data_is_swapped_in_place():
    """`param.data = ...` keeps the Parameter object but gives it new storage: the decoder must notice."""
    model = make_model(None)
    cache, last = prefill(model, [4], [0], n_slots=1)
    ref_cache = copy.deepcopy(cache)
    step = fused(model)
    tokens = torch.tensor([[last[0]]])
    with torch.inference_mode():
        step(tokens, at(4, cache), copy.deepcopy(cache))
    first = step.fused._decoder
    with torch.no_grad():
        model.layers[0].attention.wo.weight.data = torch.randn(64, 64)
    with torch.inference_mode():
        ours = step(tokens, at(4, cache), cache)
        ref = model(tokens, 4, ref_cache)
    assert step.ran_fused and step.fused._decoder is not first
    assert rel(ours, ref) < REL_TOL
