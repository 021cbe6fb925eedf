"""BF16 weights end to end: a BF16 GGUF's logits against transformers on the same weights.

The model: a tiny random Mistral-shaped transformers model (Llama blocks; its sliding window is past the
context) from tests/test_architectures.make_hf, FFN width 104 (w2's rows end 8 columns past the kernels'
16-column steps), converted by llamaforge to a BF16 GGUF and run by `Llama.build` on the C++ kernels (12
prompt rows: the prefill GEMM; generation: the fused decode step). The BF16 kernels round each matmul's
activations to bf16 and sum bf16 x bf16 products in float32 (kernels/qgemm.h). References:
- the same transformers model in float32, its weights rounded to bf16 and every nn.Linear's input rounded
  to bf16 (the arithmetic the kernels do): logits within 1e-4 relative (only float32 summation orders
  differ; observed 7e-8), and greedy tokens equal with log-probabilities within 1e-3. Without the input
  rounding the logits are more than 10x further off (so the test sees a missing rounding);
- transformers in bfloat16 end to end (every activation in bf16, as a user of the model runs it): within
  3e-2 relative (observed 7e-3).
A row's result must not depend on its batch (exact equality): a batch of 9 decodes through the prefill
GEMM (9 rows), a lone row through the decode tiles. No test asserts on time.
"""

from __future__ import annotations

import copy

import pytest
import torch

from llamaforge.convert import convert
from llamaforge.kernels import get_extension
from tests.test_architectures import TOKENS, make_hf

pytestmark = pytest.mark.skipif(get_extension() is None, reason="the C++ kernels are not available here")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bf16_semantics(ref: torch.nn.Module, round_inputs: bool = True) -> torch.nn.Module:
    """A float32 copy of `ref` with its matrices rounded to bf16 (as the GGUF holds them) and, when
    `round_inputs`, each nn.Linear's input rounded to bf16."""
    model = copy.deepcopy(ref).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(p.bfloat16().float())
    if round_inputs:
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_pre_hook(lambda _m, args: (args[0].bfloat16().float(),))
    return model


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    from llamaforge import Llama
    from llamaforge.quantize import QuantizedLinear

    root = tmp_path_factory.mktemp("bf16")
    ref = make_hf("mistral", root / "hf", dim=64, hidden=104)
    path = convert(root / "hf", root / "bf16.gguf", to="gguf", dtype="bf16")
    # a float32 KV cache, as the reference keeps K and V (a GGUF's default is llama.cpp's f16: test_kv_types.py)
    gen = Llama.build(str(path), max_seq_len=64, max_batch_size=9, device="cpu", kv_type="float32")
    for layer in (gen.model.layers[0].attention.wq, gen.model.layers[0].feed_forward.w2, gen.model.output):
        assert isinstance(layer, QuantizedLinear) and layer.qtype == "BF16" and layer.uses_kernels
    return ref, gen


def test_bf16_prefill_logits_match_transformers(bf16_model):
    ref, gen = bf16_model
    with torch.no_grad():
        got = gen.model(TOKENS)
        exact = bf16_semantics(ref)(TOKENS).logits
        unrounded = bf16_semantics(ref, round_inputs=False)(TOKENS).logits
        in_bf16 = copy.deepcopy(ref).to(torch.bfloat16)(TOKENS).logits
    assert rel(got, exact) < 1e-4
    assert rel(got, unrounded) > 10 * rel(got, exact)
    assert rel(got, in_bf16) < 3e-2


def test_bf16_decode_steps_match_transformers(bf16_model):
    ref, gen = bf16_model
    prompt = TOKENS[0, :6].tolist()
    tokens, logprobs = gen.generate([prompt], max_gen_len=6, temperature=0, logprobs=True, stop_ids=[])
    assert gen.decode_step.ran_fused  # the one-token steps ran in the fused C++ step
    seq = torch.tensor([prompt + tokens[0]])
    with torch.no_grad():
        want = torch.log_softmax(bf16_semantics(ref)(seq).logits[0].double(), -1)
    positions = range(len(prompt) - 1, seq.shape[1] - 1)  # the logits that chose each generated token
    assert tokens[0] == [int(want[p].argmax()) for p in positions]
    for p, token, lp in zip(positions, tokens[0], logprobs[0]):
        assert lp == pytest.approx(float(want[p, token]), abs=1e-3)


def test_bf16_rows_do_not_depend_on_their_batch(bf16_model):
    _, gen = bf16_model
    prompts = [[5, 17, 99], [3, 42, 7, 300, 11], [64], [250, 3], [9, 8, 7, 6], [1], [2, 2], [77, 5], [12, 13, 14]]
    batch = gen.generate(prompts, max_gen_len=5, temperature=0, logprobs=True, stop_ids=[])
    assert gen.decode_step.ran_fused
    for i, prompt in enumerate(prompts):
        tokens, logprobs = gen.generate([prompt], max_gen_len=5, temperature=0, logprobs=True, stop_ids=[])
        assert tokens[0] == batch[0][i] and logprobs[0] == batch[1][i], i
