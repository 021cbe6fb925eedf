"""LoRA: adapters start as the identity, only they train, and merging gives the same logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llamaforge.errors import ConfigError
from llamaforge.model import ModelArgs, Transformer
from llamaforge.training.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora, merge_lora_state_dict

ARGS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=32, max_seq_len=16)


def _model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**{**ARGS, **kw})).eval()


def _randomize_adapters(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=gen) * 0.5)


def test_adapters_start_as_identity_and_only_they_train():
    model = _model()
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    base = model(tokens)
    wrapped = apply_lora(model, ["wq", "wv", "w2"], rank=4, alpha=8)
    assert wrapped == [f"layers.{i}.{m}" for i in range(2) for m in ("attention.wq", "attention.wv", "feed_forward.w2")]
    torch.testing.assert_close(model(tokens), base, rtol=0, atol=0)  # B = 0: exactly the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{w}.lora_{ab}" for w in wrapped for ab in "ab"}
    assert set(lora_state_dict(model)) == trainable


def test_merged_weights_give_the_adapter_logits():
    model = _model()
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    apply_lora(model, ["wq", "wk", "wv", "wo", "w1", "w3", "output"], rank=3, alpha=6.0)
    _randomize_adapters(model)
    with torch.no_grad():
        adapted = model(tokens)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        assert merge_lora(model) == 2 * 6 + 1
        merged = model(tokens)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (adapted - _model()(tokens)).abs().max() > 1e-2  # the adapters really change the model
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    # the state-dict merge (used for export) gives the same Meta-named weights
    merged_sd = merge_lora_state_dict(sd, alpha=6.0)
    assert set(merged_sd) == set(model.state_dict())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(merged_sd[k], v, rtol=0, atol=1e-6)


def test_lora_rejects_bad_targets():
    with pytest.raises(ConfigError, match="unknown LoRA targets"):
        apply_lora(_model(), ["q_proj"])
    with pytest.raises(ConfigError, match="tie_embeddings"):
        apply_lora(_model(tie_embeddings=True), ["output"])
    model = _model()
    model.layers[0].attention.wq = nn.Identity()
    with pytest.raises(ConfigError, match="not an nn.Linear or QuantizedLinear"):
        apply_lora(model, ["wq"])
