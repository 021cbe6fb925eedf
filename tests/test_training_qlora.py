"""QLoRA: LoRA over a frozen quantized base equals LoRA over the dequantized float weights.

Tolerances: the quantized path dequantizes exactly (bit-identical to gguf-py) and runs the same float32
matmuls as the reference, so losses and gradients agree to float32 rounding (rtol 1e-4, atol 1e-6).
"""

from __future__ import annotations

import copy
import json

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llamaforge import kernels
from llamaforge.model import ModelArgs, Transformer
from llamaforge.quantize import QuantizedLinear, quantize_model_weights
from llamaforge.training import loop as loop_module
from llamaforge.training import train
from llamaforge.training.lora import LoRALinear, apply_lora
from llamaforge.training.modeling import enable_activation_checkpointing, quantized_base
from llamaforge.training.state import TrainingDiverged, load_state
from tests.test_training_support import tiny_config, tiny_meta_checkpoint

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=64, max_seq_len=32)
TOL = dict(rtol=1e-4, atol=1e-6)


def _random_blocks(qtype: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """GGUF bytes of `qtype`: quantized normal weights for the legacy types, sane random blocks for K-quants."""
    rng = np.random.default_rng(seed)
    if qtype in kernels.QUANTIZABLE:
        raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), gguf.GGMLQuantizationType[qtype])
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1))
    info = kernels.qtype_info(qtype)
    nb = cols // info.block
    raw = rng.integers(0, 256, (rows, nb, info.bytes), dtype=np.uint8)
    for off in ([208] if qtype == "Q6_K" else [0, 2]):  # f16 super-block scales: finite, small
        raw[:, :, off:off + 2] = rng.uniform(1e-2, 3e-2, (rows, nb, 1)).astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(rows, nb * info.bytes))


def _randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_a.copy_(torch.randn(m.lora_a.shape, generator=gen) * 0.3)
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_over_a_quantized_layer_has_the_float_gradients(qtype, dropout):
    raw = _random_blocks(qtype, 48, 256, seed=3)
    layer = QuantizedLinear.from_gguf(raw, qtype, (48, 256))
    quantized_base(layer)
    q = LoRALinear(layer, rank=4, alpha=8.0, dropout=dropout)
    _randomize_adapters(q)
    a = q.lora_a.detach().clone().requires_grad_(True)
    b = q.lora_b.detach().clone().requires_grad_(True)
    w = layer.dequantize()
    x = torch.randn(2, 5, 256, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.manual_seed(0)
    y = q(x)
    (y.square().mean() + y.sum() * 1e-2).backward()
    torch.manual_seed(0)  # the same dropout mask, in plain autograd on the float weight
    y_ref = F.linear(x_ref, w) + 2.0 * (F.dropout(x_ref, dropout) @ a.t()) @ b.t()
    (y_ref.square().mean() + y_ref.sum() * 1e-2).backward()
    grads = [(y.detach(), x.grad, q.lora_a.grad, q.lora_b.grad), (y_ref.detach(), x_ref.grad, a.grad, b.grad)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **TOL)
    assert grads[0][3].abs().max() > 0  # the adapters really get a gradient


def test_backward_keeps_no_float_copy_of_a_quantized_weight():
    layer = QuantizedLinear.from_gguf(_random_blocks("Q4_0", 64, 128, seed=1), "Q4_0", (64, 128))
    module = LoRALinear(layer, rank=2, alpha=4.0)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        module(torch.randn(3, 128, requires_grad=True)).sum().backward()
    assert (64, 128) not in shapes and (128, 64) not in shapes, shapes
    assert module.lora_a.grad is not None and layer.qweight.grad is None


def _pair(qtype: str, targets):
    """A quantized model and a float reference holding its dequantized weights, same LoRA adapters."""
    torch.manual_seed(0)
    float_model = Transformer(ModelArgs(**ARGS))
    q_model = quantize_model_weights(copy.deepcopy(float_model), qtype)
    quantized_base(q_model)
    ref = copy.deepcopy(float_model)
    with torch.no_grad():
        for name, module in q_model.named_modules():
            if isinstance(module, QuantizedLinear):
                ref.get_submodule(name).weight.copy_(module.dequantize())
    for model in (q_model, ref):
        apply_lora(model, targets, rank=4, alpha=8.0)
        _randomize_adapters(model)
        model.train()
    for m in ref.modules():
        if isinstance(m, LoRALinear):
            m.base.weight.requires_grad_(True)  # an unfrozen base: the reference runs in plain autograd
    return q_model, ref


@pytest.mark.parametrize("checkpointing", [False, True])
def test_qlora_model_loss_and_gradients_equal_the_dequantized_float_reference(checkpointing):
    q_model, ref = _pair("Q4_0", ["wq", "wv", "w2", "output"])
    assert sum(isinstance(m, QuantizedLinear) for m in q_model.modules()) == 2 * 7 + 1
    if checkpointing:
        enable_activation_checkpointing(q_model)
    tokens = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (q_model, ref):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], **TOL)
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if ".lora_" in n}
    q_grads = {n: p.grad for n, p in q_model.named_parameters() if p.requires_grad}
    assert set(q_grads) == set(ref_grads) and len(q_grads) == 2 * (2 * 3 + 1)
    for name, grad in q_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=name)


def test_qlora_under_bf16_autocast_stays_close_to_float():
    q_model, ref = _pair("Q8_0", ["wq", "wv"])
    tokens = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = q_model(tokens)
    loss = F.cross_entropy(low.float().flatten(0, 1), tokens.flatten())
    loss.backward()
    full = F.cross_entropy(ref(tokens).flatten(0, 1), tokens.flatten())
    assert abs(float(loss.detach()) - float(full.detach())) < 0.05  # bf16 matmuls: close, not equal
    assert all(torch.isfinite(p.grad).all() for p in q_model.parameters() if p.requires_grad)


QLORA = dict(optimizer="adamw", lr=0.01, max_steps=6, save_every=3, eval_every=3,
             lora=dict(rank=4, alpha=8.0, targets=["wq", "wv", "w1"]))


def _qlora_config(out, **kw):
    return tiny_config(out, model=str(tiny_meta_checkpoint()), model_args=None, tokenizer=None,
                       **{**QLORA, "quantize": "q4_0", **kw})


def test_qlora_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    whole = train(_qlora_config(tmp_path / "whole"))
    first = train(_qlora_config(tmp_path / "parts"), stop_after=3)
    second = train(_qlora_config(tmp_path / "parts"))
    assert second.start_step == 3
    assert first.losses + second.losses == pytest.approx(whole.losses, rel=0, abs=1e-6)
    a = load_state(tmp_path / "whole" / "checkpoint.pt")["model"]
    b = load_state(tmp_path / "parts" / "checkpoint.pt")["model"]
    assert set(a) == {f"layers.{i}.{m}.lora_{ab}" for i in range(2)
                      for m in ("attention.wq", "attention.wv", "feed_forward.w1") for ab in "ab"}
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert whole.losses[-1] < whole.losses[0]  # it learns
    # the same run in float LoRA on the dequantized weights is not this run: the base really is 4-bit
    float_run = train(_qlora_config(tmp_path / "float", quantize=None, max_steps=1, warmup_steps=0, export="none"))
    assert abs(float_run.losses[0] - whole.losses[0]) > 1e-4


def test_qlora_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = loop_module.token_loss_sum
    calls = {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        value = real(logits, targets)
        return value * float("nan") if calls["n"] == 5 else value

    monkeypatch.setattr(loop_module, "token_loss_sum", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"step 5: loss nan.*checkpoint.pt \(step 4\)"):
        train(_qlora_config(out, max_steps=10, save_every=2, eval_every=0))
    state = load_state(out / "checkpoint.pt")
    assert state["step"] == 4 and all(torch.isfinite(t).all() for t in state["model"].values())
    events = [json.loads(line).get("event") for line in (out / "log.jsonl").read_text().splitlines()]
    assert "diverged" in events and not (out / "model").exists()


def _tiny_q8_gguf(tmp_path):
    """A tiny random model with the default model's vocabulary, saved as a Q8_0 GGUF file."""
    from llamaforge import checkpoints
    from llamaforge.default_model import default_model_path
    from llamaforge.errors import CheckpointNotFoundError
    from llamaforge.tokenizer import read_gguf_metadata
    from llamaforge.training.modeling import init_weights

    try:
        metadata = read_gguf_metadata(default_model_path())
    except CheckpointNotFoundError:
        pytest.skip("the default model package is not installed")
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=len(metadata["tokenizer.ggml.tokens"]),
                     multiple_of=64, max_seq_len=64)
    model = Transformer(args)
    init_weights(model, 0.05)
    return checkpoints.save_gguf(args, model.state_dict(), tmp_path / "q8.gguf", tokenizer_metadata=metadata,
                                 dtype="q8_0")


def test_qlora_from_a_quantized_gguf_keeps_its_blocks_and_exports_a_merged_model(tmp_path):
    from llamaforge import Llama
    from llamaforge.training.modeling import load_for_training

    path = _tiny_q8_gguf(tmp_path)
    model, _, _ = load_for_training(str(path), None, torch.device("cpu"), 32, progress=False, quantize="gguf")
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 2 * 7 + 1 and all(m.qtype == "Q8_0" and m.exact for m in quantized)
    result = train(tiny_config(tmp_path / "run", model=str(path), model_args=None, tokenizer=None, quantize="gguf",
                               max_steps=2, eval_every=0, lr=0.05, lora=dict(rank=2, alpha=4.0, targets=["wq", "wv"])))
    assert result.exported.suffix == ".gguf"
    tuned = Llama.build(str(result.exported), max_seq_len=32, max_batch_size=1, device="cpu", dtype="float32")
    base = Llama.build(str(path), max_seq_len=32, max_batch_size=1, device="cpu", dtype="float32")
    changed = {k for k, v in tuned.model.state_dict().items()
               if (v - base.model.state_dict()[k]).abs().max() > 1e-3}
    assert changed and all(k.endswith(("wq.weight", "wv.weight")) for k in changed), changed


def test_quantize_settings_are_checked(tmp_path):
    from llamaforge.errors import ConfigError

    with pytest.raises(ConfigError, match="quantize must be one of"):
        _qlora_config(tmp_path / "a", quantize="q3_k")
    with pytest.raises(ConfigError, match="needs `model`\\s+and a \\[lora\\] table"):
        _qlora_config(tmp_path / "b", lora=None)
    with pytest.raises(ConfigError, match="needs a quantized GGUF file"):
        train(_qlora_config(tmp_path / "c", quantize="gguf"))
