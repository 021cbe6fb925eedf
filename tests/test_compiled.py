"""The compiled one-token step (runtime/compiled.py) and int8 weight-only layers (quantize.Int8Linear).

On the CPU the compiled step runs through inductor ("default" mode): its logits must match the eager
modules' to float tolerance, step after step, with rows in arbitrary slots and the batch size changing.
On CUDA (skipped elsewhere) the same check runs in bfloat16 with CUDA graphs ("reduce-overhead").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llamaforge.errors import ConfigError
from llamaforge.model import KVCache, ModelArgs, StepInput, Transformer
from llamaforge.quantize import Int8Linear, quantize_model_weights
from llamaforge.runtime import DecodeStep

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=48)


def tiny_model(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ARGS).eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    return model.to(device=device, dtype=dtype)


def run_steps(model: Transformer, step: DecodeStep, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Greedy one-token steps: two rows in slots 2 and 0 at different positions, then one row alone."""
    cache = KVCache.for_model(ARGS, 3, 48, dtype=dtype, device=device)
    out = []
    tokens = torch.tensor([[5], [7]], device=device)
    with torch.inference_mode():
        for i in range(5):
            pos = torch.tensor([[i], [i + 3]], device=device)
            slots = torch.tensor([2, 0], device=device)
            st = StepInput.make(pos, 2, 1, device=device, cache_len=48, slots=slots, kv_len=i + 4)
            logits = step(tokens, st, cache)
            out.append(logits.float().cpu())
            tokens = logits[:, -1].argmax(-1, keepdim=True)
        for i in range(5, 8):  # a new batch size: its own graph
            st = StepInput.make(torch.tensor([[i]], device=device), 1, 1, device=device, cache_len=48,
                                slots=torch.tensor([2], device=device), kv_len=i + 1)
            logits = step(tokens[:1], st, cache)
            out.append(logits.float().cpu())
            tokens = logits[:, -1].argmax(-1, keepdim=True)
    return out


@pytest.mark.slow
def test_compiled_step_matches_eager_on_cpu():
    model = tiny_model()
    compiled = DecodeStep(model, compiled=True)
    assert compiled.fused is None and compiled.compiled is not None
    eager = run_steps(model, DecodeStep(model), "cpu", torch.float32)
    got = run_steps(model, compiled, "cpu", torch.float32)
    for a, b in zip(eager, got):
        # float32, summation order differs (whole cache under a mask vs the first kv_len positions)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_step_matches_eager_on_cuda_with_graphs():
    model = tiny_model("cuda", torch.bfloat16)
    compiled = DecodeStep(model, compiled=True)
    assert compiled.compiled.mode == "reduce-overhead"
    eager = run_steps(model, DecodeStep(model), "cuda", torch.bfloat16)
    got = run_steps(model, compiled, "cuda", torch.bfloat16)
    for a, b in zip(eager, got):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)  # bfloat16 logits, another kernel order


def test_compiled_step_steps_aside_under_autograd():
    model = tiny_model()
    step = DecodeStep(model, compiled=True)
    cache = KVCache.for_model(ARGS, 1, 48, dtype=torch.float32, device="cpu")
    st = StepInput.make(torch.tensor([[0]]), 1, 1, device="cpu", cache_len=48, kv_len=1)
    with torch.enable_grad():  # the compiled function is never called: no compile, the modules run
        assert step.compiled(model, torch.tensor([[3]]), st, cache) is None


def test_int8_linear_is_its_dequantized_weight():
    torch.manual_seed(1)
    linear = nn.Linear(96, 40, bias=True)
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (40,)
    w = linear.weight.detach()
    # symmetric per-row rounding: each weight within half a step of its row's scale
    assert ((q.dequantize() - w).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 5, 96)
    torch.testing.assert_close(q(x), F.linear(x, q.dequantize(), linear.bias.detach()), rtol=1e-5, atol=1e-5)
    rel = (q(x) - linear(x)).norm() / linear(x).norm()
    assert rel < 0.02  # 8-bit rows: about 0.5% of the output's norm on Gaussian weights


def test_quantize_model_weights_int8_swaps_every_linear():
    model = tiny_model()
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(tokens)
        quantize_model_weights(model, "int8")
        after = model(tokens)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert not linears and isinstance(model.output, Int8Linear)
    assert isinstance(model.tok_embeddings, nn.Embedding)  # embeddings stay float
    assert (after - before).norm() / before.norm() < 0.05
    with pytest.raises(ConfigError, match="int8"):
        quantize_model_weights(tiny_model(), "int3")


@pytest.mark.slow
def test_llama_build_compile_gives_the_same_greedy_text(tiny_checkpoints):
    from llamaforge import Llama

    kw = dict(max_seq_len=64, max_batch_size=2, device="cpu", dtype="float32")
    plain = Llama.build(str(tiny_checkpoints.meta), **kw)
    compiled = Llama.build(str(tiny_checkpoints.meta), compile=True, **kw)
    assert compiled.decode_step.compiled is not None and compiled.decode_step.fused is None
    prompts = ["the llama", "hello world of"]
    want = plain.text_completion(prompts, temperature=0, max_gen_len=12)
    got = compiled.text_completion(prompts, temperature=0, max_gen_len=12)
    assert [g["generation"] for g in got] == [w["generation"] for w in want]


def test_compile_flag_reaches_llama_build():
    from llamaforge.cli.main import build_parser

    args = build_parser().parse_args(["generate", "--compile", "hello"])
    assert args.compile is True
