"""The published shapes of Llama-family models parse and build (on the meta device: no memory used).

Configs are the models' own config.json / params.json values; parameter counts are the published ones
(within 1%).
"""

import pytest
import torch

from llamaforge.checkpoints.hf import args_from_config
from llamaforge.checkpoints.meta import args_from_params
from llamaforge.model import Transformer

HF_CONFIGS = {
    "TinyLlama-1.1B": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                            num_key_value_heads=4, vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=2048,
                            rope_theta=10000.0, model_type="llama", architectures=["LlamaForCausalLM"]), 1.10e9),
    "open_llama_3b": (dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
                           vocab_size=32000, rms_norm_eps=1e-6, max_position_embeddings=2048, model_type="llama",
                           architectures=["LlamaForCausalLM"]), 3.43e9),
    "SmolLM2-135M": (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, rms_norm_eps=1e-5, max_position_embeddings=8192,
                          rope_theta=100000, tie_word_embeddings=True, model_type="llama",
                          architectures=["LlamaForCausalLM"]), 1.35e8),
    "Llama-3.2-1B": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=64, vocab_size=128256, rms_norm_eps=1e-5,
                          max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                          rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                        "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                          model_type="llama", architectures=["LlamaForCausalLM"]), 1.24e9),
}

META_PARAMS = {
    "llama-7b (Llama 1)": (dict(dim=4096, multiple_of=256, n_heads=32, n_layers=32, norm_eps=1e-6, vocab_size=-1),
                           32000, 6.74e9),
    "llama-2-13b": (dict(dim=5120, multiple_of=256, n_heads=40, n_layers=40, norm_eps=1e-5, vocab_size=-1),
                    32000, 13.0e9),
    "llama-2-70b": (dict(dim=8192, multiple_of=4096, ffn_dim_multiplier=1.3, n_heads=64, n_kv_heads=8, n_layers=80,
                         norm_eps=1e-5, vocab_size=-1), 32000, 69.0e9),
    "CodeLlama-7b": (dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, ffn_dim_multiplier=1.0, norm_eps=1e-5,
                          rope_theta=1000000, vocab_size=32016), 32016, 6.74e9),
    "Meta-Llama-3-8B": (dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                             ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0), 128256, 8.03e9),
    "Llama-3.1-8B": (dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                          ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
                     128256, 8.03e9),
}


def build_on_meta(args) -> int:
    with torch.device("meta"):
        model = Transformer(args)
    n = sum(p.numel() for p in model.parameters())
    assert n == args.n_params
    return n


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_hf_shapes(name):
    config, published = HF_CONFIGS[name]
    args = args_from_config(config, name)
    assert build_on_meta(args) == pytest.approx(published, rel=0.01)


@pytest.mark.parametrize("name", META_PARAMS)
def test_meta_shapes(name):
    params, vocab, published = META_PARAMS[name]
    args = args_from_params(params, vocab, name)
    assert args.vocab_size == vocab
    assert build_on_meta(args) == pytest.approx(published, rel=0.01)
    if params.get("use_scaled_rope"):
        assert args.rope_scaling is not None and args.rope_scaling.factor == 8.0
