"""LoRA deltas inside the fused C++ decode step (kernels/qlora.h via runtime/fused.py).

Tiny random models (float32 and Q8_0) with random PEFT adapters of different ranks and projections.
Tolerances: the fused step's adapted logits within 1e-4 (absolute) of the PyTorch modules' (`RowLoRA`, the
reference: same products, summed in another order; the Q8_0 base layers run the same int8 kernels in both);
a row's logits in a mixed batch bit-identical to the same row stepped alone.
"""

from __future__ import annotations

import copy

import pytest
import torch

from llamaforge.generation.runner import PrefillChunk, Runner
from llamaforge.kernels import get_extension
from llamaforge.model import ModelArgs, Transformer
from llamaforge.runtime import DecodeStep
from llamaforge.runtime.adapters import AdapterTable, RowLoRA
from tests.test_serve_adapters import write_peft

pytestmark = pytest.mark.skipif(get_extension() is None, reason="the C++ kernels are not available here")

CPU = torch.device("cpu")
MAX_SEQ = 64
PROMPTS = [[1, 5, 9, 14, 3], [1, 7, 7, 2, 30, 41, 8], [1, 60, 11]]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():  # as the engine runs (the fused step stands aside under autograd)
        yield


def served_model(tmp_path, quantized: bool):
    """(model, table, [adapter a, adapter b, adapter c]) over one tiny model; c covers every projection."""
    from llamaforge.quantize import quantize_model_weights

    torch.manual_seed(0)
    base = Transformer(ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=256,
                                 max_seq_len=MAX_SEQ)).eval()
    write_peft(tmp_path / "a", base, seed=1)
    write_peft(tmp_path / "b", base, targets=("wo", "w1", "w3"), rank=2, alpha=4, seed=2)
    write_peft(tmp_path / "c", base, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"), rank=8, alpha=8, seed=3)
    model = quantize_model_weights(copy.deepcopy(base), "q8_0") if quantized else base
    table = AdapterTable(model)
    return model, table, [table.add(n, tmp_path / n) for n in "abc"]


def prefilled(model, table, adapters):
    """A runner over `model` and a cache with PROMPTS[i % 3] prefilled in slot i for adapter adapters[i]."""
    runner = Runner(model, CPU, DecodeStep(model, fused=True), adapters=table)
    cache = runner.new_cache(len(adapters), MAX_SEQ)
    tables = cache.slot_tables.tolist()  # slot i's blocks
    for i, adapter in enumerate(adapters):
        runner.prefill(cache, [PrefillChunk(PROMPTS[i % 3], 0, tables[i], adapter=adapter)])
    return runner, cache


def step_rows(runner, cache, adapters, rows):
    """One decode step of batch `rows` (slots), each on its adapter -> logits (len(rows), V)."""
    tables = cache.slot_tables.tolist()
    return runner.decode(cache, [3 + r for r in rows], [len(PROMPTS[r % 3]) for r in rows],
                         [tables[r] for r in rows], [adapters[r] for r in rows])


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_deltas_equal_the_modules_and_run_fused(tmp_path, quantized, monkeypatch):
    model, table, (a, b, c) = served_model(tmp_path, quantized)
    adapters = [a, None, b, c, a, None, c]
    runner, cache = prefilled(model, table, adapters)
    ref_cache, plain_cache = copy.deepcopy(cache), copy.deepcopy(cache)
    calls = []
    monkeypatch.setattr(RowLoRA, "forward", lambda self, x: calls.append(self.name) or self.base(x))
    rows = list(range(len(adapters)))
    got = step_rows(runner, cache, adapters, rows)
    assert runner.decode_step.ran_fused and not calls  # the adapted rows ran in the C++ step, no module ran
    monkeypatch.undo()
    modules = Runner(model, CPU, DecodeStep(model), adapters=table)  # the PyTorch reference: RowLoRA's bmm
    want = step_rows(modules, ref_cache, adapters, rows)
    assert not modules.decode_step.ran_fused
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    assert torch.allclose(cache.k, ref_cache.k, atol=1e-5) and torch.allclose(cache.v, ref_cache.v, atol=1e-5)
    plain = step_rows(runner, plain_cache, [None] * len(adapters), rows)  # the same step without deltas
    for i, adapter in enumerate(adapters):
        if adapter is None:
            assert torch.equal(got[i], plain[i])
        else:
            assert (got[i] - plain[i]).abs().max() > 1e-2  # the deltas were applied


@pytest.mark.parametrize("quantized", [False, True])
def test_a_row_in_a_mixed_fused_batch_equals_the_row_alone(tmp_path, quantized):
    model, table, (a, b, c) = served_model(tmp_path, quantized)
    adapters = [a, None, b, c, a, None, c, b]
    runner, cache = prefilled(model, table, adapters)
    snapshot = cache.k.clone(), cache.v.clone()
    together = step_rows(runner, cache, adapters, range(len(adapters)))
    assert runner.decode_step.ran_fused
    for r in range(len(adapters)):
        cache.k.copy_(snapshot[0])
        cache.v.copy_(snapshot[1])
        alone = step_rows(runner, cache, adapters, [r])
        assert runner.decode_step.ran_fused
        assert torch.equal(alone[0], together[r]), r


def test_adapters_added_and_removed_at_run_time_stay_fused(tmp_path):
    model, table, (a, b, c) = served_model(tmp_path, quantized=True)
    table.remove("b")
    write_peft(tmp_path / "d", model, targets=("wv", "w2"), rank=3, alpha=6, seed=4)
    d = table.add("d", tmp_path / "d")  # its projections are wrapped already: the decoder is kept
    adapters = [d, None, a]
    runner, cache = prefilled(model, table, adapters)
    ref_cache = copy.deepcopy(cache)
    got = step_rows(runner, cache, adapters, range(3))
    assert runner.decode_step.ran_fused
    want = step_rows(Runner(model, CPU, DecodeStep(model), adapters=table), ref_cache, adapters, range(3))
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    table.remove("d")  # a request still running with d keeps its weights
    assert torch.equal(step_rows(runner, cache, adapters, [0]), step_rows(runner, cache, adapters, [0]))


def test_the_native_adapter_refuses_tensors_that_do_not_fit(tmp_path):
    ext = get_extension()
    a, b = torch.zeros(4, 128), torch.zeros(128, 4)
    with pytest.raises(RuntimeError, match="7 entries"):
        ext.LoraAdapter([[(a, b)]], 1.0)
    with pytest.raises(RuntimeError, match="of one dtype"):
        ext.LoraAdapter([[(a, torch.zeros(128, 3))] + [None] * 6], 1.0)
    model, table, _ = served_model(tmp_path, quantized=False)
    step = DecodeStep(model, fused=True)
    runner, cache = prefilled(model, table, [None])
    decoder = step.fused._decoder_for(model)
    wrong = ext.LoraAdapter([[(torch.zeros(4, 64), torch.zeros(128, 4))] + [None] * 6] * 2, 1.0)
    h = model.tok_embeddings(torch.tensor([[3]]))
    with pytest.raises(RuntimeError, match="adapter pair of layer 0"):
        decoder.step(h, torch.tensor([5]), cache.slot_tables[:1], cache.k, cache.v, MAX_SEQ, [wrong], torch.tensor([0]))
    with pytest.raises(RuntimeError, match="names adapter 1"):
        decoder.step(h, torch.tensor([5]), cache.slot_tables[:1], cache.k, cache.v, MAX_SEQ, [], torch.tensor([1]))


def test_the_delta_kernel_equals_the_pytorch_formula_and_ignores_padding():
    """lora_add_ (kernels/qlora.h) against y + scale * (x A^T) B^T per row in float64 (within 1e-6 of the
    largest value); rows of other adapters, padding and batch size leave a row's delta bit for bit unchanged."""
    ext = get_extension()
    g = torch.Generator().manual_seed(0)
    K, N, T = 80, 100, 5  # neither a multiple of 32 nor of 8: every tail path runs
    pairs = [(torch.randn(r, K, generator=g), torch.randn(N, r, generator=g)) for r in (3, 8)]
    adapters = [ext.LoraAdapter([[p] + [None] * 6], s) for p, s in zip(pairs, (0.5, 2.0))]
    x = torch.randn(4, T, K, generator=g)
    y0 = torch.randn(4, T, N, generator=g)
    ids = torch.tensor([1, -1, 0, 1])
    y = y0.clone()
    ext.lora_add_(y, x, adapters, ids, 0, 0)
    want = y0.double()
    for b, i in enumerate(ids.tolist()):
        if i >= 0:
            (a, bb), s = pairs[i], (0.5, 2.0)[i]
            want[b] += (x[b].double() @ a.double().t() @ bb.double().t()) * s
    tol = 1e-6 * want.abs().max()
    assert torch.equal(y[1], y0[1])
    assert (y - want).abs().max() <= tol
    alone = y0[3:4].clone()
    ext.lora_add_(alone, x[3:4], adapters, torch.tensor([1]), 0, 0)
    assert torch.equal(alone, y[3:4])
    longer = torch.cat([x[3:4], torch.randn(1, 3, K, generator=g)], dim=1)  # the row padded to 8 tokens
    out = torch.cat([y0[3:4], torch.zeros(1, 3, N)], dim=1)
    ext.lora_add_(out, longer, adapters, torch.tensor([1]), 0, 0)
    assert torch.equal(out[:, :T], y[3:4])
    before = y.clone()
    ext.lora_add_(y, x, adapters, ids, 0, 1)  # a projection neither adapter adapts: nothing changes
    assert torch.equal(y, before)


@pytest.mark.parametrize("quantized", [False, True])
def test_adapted_prompt_chunks_share_the_batched_prefill(tmp_path, quantized):
    """Adapted chunks padded into one forward with others give the logits of each chunk alone, within 1e-5:
    the delta kernel computes each token row alone; float GEMMs of the base (the float model's layers, the
    output layer of both) see more rows and move the last bits, as they do for rows without an adapter."""
    model, table, (a, b, c) = served_model(tmp_path, quantized)
    runner = Runner(model, CPU, DecodeStep(model, fused=True), adapters=table)
    adapters = [a, None, c, b]
    tables = runner.new_cache(4, MAX_SEQ).slot_tables.tolist()  # every cache below has the same slot blocks
    chunks = [PrefillChunk(PROMPTS[i % 3], 0, tables[i], all_logits=True, adapter=x) for i, x in enumerate(adapters)]
    calls = []
    real = runner._prefill_rows
    runner._prefill_rows = lambda cache, group: calls.append(len(group)) or real(cache, group)
    together = runner.prefill(runner.new_cache(4, MAX_SEQ), chunks)
    assert calls == [4]  # one forward
    for i, chunk in enumerate(chunks):
        alone = runner.prefill(runner.new_cache(4, MAX_SEQ), [chunk])[0]
        assert torch.allclose(alone, together[i], atol=1e-5, rtol=0), i


def test_adapters_holding_16_bit_values_run_from_16_bit_copies_with_the_same_results():
    from llamaforge.runtime.adapters import _compact

    ext = get_extension()
    g = torch.Generator().manual_seed(1)
    a32, b32 = torch.randn(8, 72, generator=g), torch.randn(40, 8, generator=g)
    x, y0 = torch.randn(3, 2, 72, generator=g), torch.randn(3, 2, 40, generator=g)
    ids = torch.tensor([0, -1, 0])
    for dtype in (torch.bfloat16, torch.float16):
        a, b = a32.to(dtype).float(), b32.to(dtype).float()  # float32 tensors holding 16-bit values
        a16, b16 = _compact(a, b)
        assert a16.dtype == b16.dtype == dtype or (dtype == torch.float16 and a16.dtype == torch.bfloat16)
        outs = []
        for pair in ((a, b), (a16, b16), (a.to(dtype), b.to(dtype))):
            y = y0.clone()
            ext.lora_add_(y, x, [ext.LoraAdapter([[pair] + [None] * 6], 0.5)], ids, 0, 0)
            outs.append(y)
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert _compact(a32, b32)[0].dtype == torch.float32  # random float32 values stay float32
