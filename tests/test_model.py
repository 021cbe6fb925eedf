"""Model numerics: cached decoding equals full recomputation; shapes and tying behave.

Tolerance: float32, 1e-5 absolute on logits of a tiny random model.
"""

import pytest
import torch

from llamaforge.errors import CheckpointError, ConfigError
from llamaforge.model import KVCache, ModelArgs, Transformer, build_model
from llamaforge.model.args import meta_hidden_dim
from llamaforge.model.layers import rope_frequencies
from llamaforge.model.args import RopeScaling

CPU = torch.device("cpu")


def tiny(**kw):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, hidden_dim=96, max_seq_len=32)
    base.update(kw)
    torch.manual_seed(0)
    return Transformer(ModelArgs(**base)).eval()


@torch.no_grad()
def test_cached_decoding_equals_full_recomputation():
    model = tiny()
    tokens = torch.randint(0, 101, (3, 12))
    full = model(tokens)
    cache = KVCache.for_model(model.args, 3, 16, dtype=torch.float32, device=CPU)
    pieces = [model(tokens[:, :5], torch.arange(5), cache, kv_len=5)]
    for pos in range(5, 12):
        pieces.append(model(tokens[:, pos : pos + 1], torch.tensor([pos]), cache, kv_len=pos + 1))
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_slots_with_their_own_positions_decode_independently():
    """Rows in different slots at different positions give the same logits as each alone."""
    model = tiny()
    a, b = torch.randint(0, 101, (1, 9)), torch.randint(0, 101, (1, 4))
    cache = KVCache.for_model(model.args, 4, 16, dtype=torch.float32, device=CPU)
    slots = torch.tensor([2, 0])
    model(a[:, :8], torch.arange(8), cache, slots=slots[:1], kv_len=8)
    model(b[:, :3], torch.arange(3), cache, slots=slots[1:], kv_len=3)
    step = torch.cat([a[:, 8:9], b[:, 3:4]])  # (2, 1)
    pos = torch.tensor([[8], [3]])
    logits = model(step, pos, cache, slots=slots, kv_len=9)
    torch.testing.assert_close(logits[0, 0], model(a)[0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, 0], model(b)[0, -1], atol=1e-5, rtol=0)


def test_tied_embeddings_share_one_matrix():
    model = tiny(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight


def test_build_model_assigns_exact_weights_and_reports_bad_keys():
    model = tiny()
    sd = model.state_dict()
    built = build_model(model.args, sd, device=CPU, dtype=torch.float32)
    tokens = torch.randint(0, 101, (2, 6))
    torch.testing.assert_close(built(tokens), model(tokens), atol=0, rtol=0)
    bad = dict(sd)
    bad.pop("layers.1.feed_forward.w2.weight")
    bad["layers.9.attention.wq.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.w2\.weight.*layers\.9"):
        build_model(model.args, bad, device=CPU, dtype=torch.float32)
    wrong = dict(sd)
    wrong["norm.weight"] = torch.ones(65)
    with pytest.raises(CheckpointError, match="norm.weight has shape"):
        build_model(model.args, wrong, device=CPU, dtype=torch.float32)


def test_meta_hidden_dim_formula():
    assert meta_hidden_dim(4096, 256, None) == 11008  # Llama 2 7B
    assert meta_hidden_dim(5120, 256, None) == 13824  # Llama 2 13B
    assert meta_hidden_dim(8192, 4096, 1.3) == 28672  # Llama 2 70B
    assert meta_hidden_dim(4096, 1024, 1.3) == 14336  # Llama 3 8B


def test_llama31_rope_scaling_matches_meta_apply_scaling():
    freqs = rope_frequencies(128, 500000.0, RopeScaling())
    base = rope_frequencies(128, 500000.0, None)
    # Highest frequencies unchanged, lowest divided by 8 (Meta's apply_scaling with its constants).
    assert freqs[0] == base[0]
    assert freqs[-1] == pytest.approx(base[-1] / 8)
    assert torch.all(freqs <= base)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dim=0), "dim"),
        (dict(n_heads=3), "divisible"),
        (dict(n_kv_heads=3), "multiple of n_kv_heads"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(norm_eps=0.0), "norm_eps"),
    ],
)
def test_bad_model_args_raise(kw, match):
    base = dict(dim=64, n_layers=2, n_heads=4, vocab_size=10)
    base.update(kw)
    with pytest.raises(ConfigError, match=match):
        ModelArgs(**base)


@torch.no_grad()
def test_hidden_states_of_an_intermediate_layer():
    model = tiny()
    tokens = torch.randint(0, 101, (2, 5))
    torch.testing.assert_close(model.hidden_states(tokens, layer=0), model.tok_embeddings(tokens))
    full = model.hidden_states(tokens)
    torch.testing.assert_close(model.norm(model.hidden_states(tokens, layer=2)), full)
    assert not torch.allclose(model.hidden_states(tokens, layer=1), model.hidden_states(tokens, layer=2))


@torch.no_grad()
def test_int_start_position_equals_explicit_positions():
    """The mask-free fast paths (int start) give the logits of explicit per-row positions."""
    model = tiny()
    tokens = torch.randint(0, 101, (2, 9))
    caches = [KVCache.for_model(model.args, 2, 16, dtype=torch.float32, device=CPU) for _ in range(2)]
    fast = [model(tokens[:, :4], 0, caches[0]), model(tokens[:, 4:7], 4, caches[0]), model(tokens[:, 7:8], 7, caches[0])]
    slow = [model(tokens[:, :4], torch.arange(4).expand(2, 4), caches[1], kv_len=4),
            model(tokens[:, 4:7], torch.arange(4, 7).expand(2, 3), caches[1], kv_len=7),
            model(tokens[:, 7:8], torch.tensor([[7], [7]]), caches[1], kv_len=8)]
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(tokens, 0), model(tokens, torch.arange(9)), atol=1e-5, rtol=0)
    torch.testing.assert_close(model(tokens[:, 2:], 2)[:, -1], model(tokens[:, 2:], torch.arange(2, 9))[:, -1],
                               atol=1e-5, rtol=0)


def test_step_input_says_where_tokens_sit():
    """StepInput.make: no mask in the mask-free cases (prefill from 0, one query), per-row visibility otherwise."""
    from llamaforge.model import StepInput

    prefill = StepInput.make(0, 2, 5, device=CPU, cache_len=16)
    assert prefill.mask is None and prefill.kv_len == 5 and prefill.positions.tolist() == [[0, 1, 2, 3, 4]] * 2
    one = StepInput.make(3, 2, 1, device=CPU, cache_len=16)
    assert one.mask is None and one.kv_len == 4 and one.positions.tolist() == [[3], [3]]
    chunk = StepInput.make(3, 1, 2, device=CPU, cache_len=16)  # positions 3, 4 over keys 0..4
    assert chunk.mask.tolist() == [[[[True] * 4 + [False], [True] * 5]]]
    rows = StepInput.make(torch.tensor([[3], [7]]), 2, 1, device=CPU, cache_len=16, slots=torch.tensor([1, 0]),
                          kv_len=8)
    assert rows.mask.shape == (2, 1, 1, 8) and rows.mask[0, 0, 0].tolist() == [True] * 4 + [False] * 4
    assert rows.mask[1].all() and rows.slots.tolist() == [1, 0]
    # the same StepInput through the model gives what the positional arguments give; mixing both is an error
    model = tiny()
    tokens = torch.randint(0, 101, (2, 1))
    caches = [KVCache.for_model(model.args, 2, 16, dtype=torch.float32, device=CPU) for _ in range(2)]
    with torch.no_grad():
        a = model(tokens, rows, caches[0])
        b = model(tokens, torch.tensor([[3], [7]]), caches[1], slots=torch.tensor([1, 0]), kv_len=8)
    assert torch.equal(a, b) and torch.equal(caches[0].k, caches[1].k)
    with pytest.raises(ConfigError, match="inside the StepInput"):
        model(tokens, rows, caches[0], kv_len=8)


def test_build_model_refuses_quantized_tensors():
    """The model builds float modules only: GGUF blocks go through llamaforge.runtime.build, which says so."""
    class Blocks:  # what a quantized checkpoint tensor looks like (GGUFQuantTensor)
        shape = (64, 64)

    model = tiny()
    sd = dict(model.state_dict())
    sd["layers.0.attention.wq.weight"] = Blocks()
    with pytest.raises(CheckpointError, match="runtime.build"):
        build_model(model.args, sd, device=CPU, dtype=torch.float32)


def test_a_forward_past_max_seq_len_is_a_clear_error():
    """Tokens at positions past the rotary tables (the built max_seq_len) are a GenerationError naming
    max_seq_len, not an IndexError from inside the rotary lookup."""
    from llamaforge.errors import GenerationError

    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                                  max_seq_len=8))
    model(torch.zeros(1, 8, dtype=torch.long))  # exactly max_seq_len fits
    with pytest.raises(GenerationError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
