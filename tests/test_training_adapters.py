"""Adapter files: PEFT's layout round-trips through PEFT's own loader, GGUF LoRA through llama.cpp's format.

References: transformers' LlamaForCausalLM + peft's PeftModel on the same tiny weights (logits within
atol 1e-4: float32, different op order); GGUF LoRA read back bit-exactly (f32).
"""

from __future__ import annotations

import functools
import importlib.util
import json

import pytest
import torch
from torch import nn

from llamaforge import Llama, checkpoints
from llamaforge.errors import CheckpointError
from llamaforge.model import ModelArgs, Transformer
from llamaforge.checkpoints.adapters import read_adapter, save_gguf_lora, save_peft
from llamaforge.training.adapters import adapter_from_state_dict, apply_adapters
from llamaforge.training.lora import LoRALinear, apply_lora, lora_state_dict
from llamaforge.training.modeling import init_weights
from tests.test_training_support import tiny_meta_checkpoint

pytest.importorskip("peft")
ALL = ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomize(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=gen) * 0.2)


@functools.lru_cache(maxsize=None)
def _hf_copy(tmp_root: str):
    """The tiny Meta test model saved in Hugging Face's layout (q/k rows permuted), and its shape."""
    from pathlib import Path

    ckpt = checkpoints.load(tiny_meta_checkpoint())
    out = Path(tmp_root) / "hf"
    checkpoints.save_hf(ckpt.args, ckpt.state_dict, out, tokenizer_path=None, overwrite=True)
    return out, ckpt


def _tokens():
    return torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))


def _peft_model(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()


def test_saved_adapters_load_in_peft_and_give_the_same_logits(tmp_path):
    from peft import PeftModel

    hf_dir, ckpt = _hf_copy(str(tmp_path))
    llama = Llama.build(str(tiny_meta_checkpoint()), max_seq_len=64, max_batch_size=1, device="cpu", dtype="float32")
    model = llama.model
    apply_lora(model, ALL, rank=4, alpha=8.0)
    _randomize(model)
    save_peft(adapter_from_state_dict(lora_state_dict(model), 8.0), model.args, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert sorted(config["target_modules"]) == sorted(HF_TARGETS + ["lm_head"])
    peft_model = PeftModel.from_pretrained(_peft_model(hf_dir), str(tmp_path / "adapter")).eval()
    tokens = _tokens()
    with torch.no_grad():
        ours = model(tokens)
        theirs = peft_model(tokens).logits
        base = _peft_model(hf_dir)(tokens).logits
    assert (ours - base).abs().max() > 1e-2  # the adapters change the model
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rslora", [False, True])  # rsLoRA scales by alpha / sqrt(r) instead of alpha / r
def test_peft_trained_adapters_load_with_llama_build(tmp_path, rslora):
    from peft import LoraConfig, get_peft_model

    hf_dir, _ = _hf_copy(str(tmp_path))
    torch.manual_seed(0)
    peft_model = get_peft_model(_peft_model(hf_dir), LoraConfig(r=4, lora_alpha=12, target_modules=HF_TARGETS,
                                                                init_lora_weights=False, use_rslora=rslora)).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    tuned = Llama.build(str(tiny_meta_checkpoint()), max_seq_len=64, max_batch_size=1, device="cpu",
                        dtype="float32", adapters=[tmp_path / "peft"])
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(tuned.model(tokens), peft_model(tokens).logits, rtol=1e-4, atol=1e-4)


def test_gguf_lora_holds_the_same_adapter_and_applies_over_quantized_weights(tmp_path):
    import gguf

    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=64, max_seq_len=64)
    model = Transformer(args)
    init_weights(model, 0.05)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, ["wq", "wk", "wv", "w2"], rank=2, alpha=4.0)
    _randomize(model)
    adapter = adapter_from_state_dict(lora_state_dict(model), 4.0)
    path = save_gguf_lora(adapter, args, tmp_path / "lora.gguf")
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    assert reader.get_field("adapter.lora.alpha").contents() == 4.0
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    back = read_adapter(path, args)
    assert set(back.weights) == set(adapter.weights) and back.alpha == 4.0 and back.rank == 2
    for k, (a, b) in adapter.weights.items():
        assert torch.equal(back.weights[k][0], a) and torch.equal(back.weights[k][1], b)
    # merged into float weights: the LoRA model's logits
    plain = Transformer(args)
    plain.load_state_dict(base_sd)
    apply_adapters(plain, [path])
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    # beside Q8_0 weights (kept quantized, adapters unmerged): close to the float result
    from llamaforge.quantize import quantize_model_weights

    quant = Transformer(args)
    quant.load_state_dict(base_sd)
    quantize_model_weights(quant, "q8_0")
    apply_adapters(quant.eval(), [path])
    assert isinstance(quant.layers[0].attention.wq, LoRALinear)
    with torch.no_grad():
        got, want = quant(tokens), model(tokens)
    assert (got - want).norm() / want.norm() < 3e-2  # Q8_0 weights and int8 activations


def test_adapters_for_another_model_are_refused(tmp_path):
    torch.manual_seed(0)
    small = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=50, multiple_of=32, max_seq_len=16))
    apply_lora(small, ["wq"], rank=2, alpha=2.0)
    save_peft(adapter_from_state_dict(lora_state_dict(small), 2.0), small.args, tmp_path / "small")
    with pytest.raises(CheckpointError, match="another model"):
        Llama.build(str(tiny_meta_checkpoint()), max_seq_len=64, max_batch_size=1, device="cpu",
                    adapters=[tmp_path / "small"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
        read_adapter(tmp_path / "empty", small.args)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_adapter(tmp_path / "missing", small.args)


def test_a_lora_run_writes_its_adapters_which_reload_to_the_merged_model(tmp_path):
    from llamaforge.training import train
    from tests.test_training_support import tiny_config

    result = train(tiny_config(tmp_path / "run", model=str(tiny_meta_checkpoint()), model_args=None, tokenizer=None,
                               max_steps=3, eval_every=0, lr=0.05, lora=dict(rank=4, alpha=8.0, targets=["wq", "wv"])))
    assert result.adapter == tmp_path / "run" / "adapter" and (tmp_path / "run" / "adapter.gguf").is_file()
    merged = Llama.build(str(result.exported), max_seq_len=64, max_batch_size=1, device="cpu")
    for adapter in (result.adapter, tmp_path / "run" / "adapter.gguf"):
        reloaded = Llama.build(str(tiny_meta_checkpoint()), max_seq_len=64, max_batch_size=1, device="cpu",
                               adapters=[adapter])
        for k, v in merged.model.state_dict().items():
            torch.testing.assert_close(reloaded.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_gguf_lora_loads_in_llama_cpp(tmp_path):  # pragma: no cover - needs llama-cpp-python
    import llama_cpp

    from llamaforge.default_model import default_model_path

    base = Llama.build(None, max_seq_len=64, max_batch_size=1, device="cpu")
    model = base.model
    apply_lora(model, ["wq", "wv"], rank=2, alpha=4.0)
    path = save_gguf_lora(adapter_from_state_dict(lora_state_dict(model), 4.0), base.args, tmp_path / "lora.gguf")
    llm = llama_cpp.Llama(model_path=str(default_model_path()), lora_path=str(path), n_ctx=64, verbose=False)
    assert llm("The capital of France is", max_tokens=4)["choices"][0]["text"] is not None
