"""What a checkpoint's config claims is validated before anything is sized by it.

- The rotary tables cover the `max_seq_len` being built, not the context length a file declares.
- ModelArgs checks every field's type and range (one table), so Meta params.json, Hugging Face
  config.json and GGUF metadata all get the same caps.
- config.json / params.json values of the wrong type are a CheckpointError naming the key; a fuzz test
  puts random JSON values under every key llamaforge reads.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaforge import Llama, checkpoints
from llamaforge.checkpoints.hf import CONFIG_TYPES, args_from_config, config_from_args, read_config
from llamaforge.checkpoints.meta import PARAM_TYPES, args_from_params
from llamaforge.convert import sentencepiece_gguf_metadata
from llamaforge.errors import CheckpointError, ConfigError, LlamaforgeError
from llamaforge.model.args import MAX_CONTEXT, ModelArgs


def test_rotary_tables_are_sized_by_the_build_not_the_file(tiny_checkpoints, tmp_path: Path) -> None:
    t = tiny_checkpoints
    claims = dataclasses.replace(t.args, max_seq_len=1 << 22)  # 4M positions: 1 GiB of float32 tables
    path = checkpoints.save_gguf(claims, t.state_dict, tmp_path / "long.gguf",
                                 tokenizer_metadata=sentencepiece_gguf_metadata(t.tokenizer))
    llama = Llama.build(path, max_seq_len=64, max_batch_size=1, device="cpu", dtype="float32")
    assert llama.args.max_seq_len == 1 << 22  # the model's context is still reported as the file says
    assert tuple(llama.model.rope.cos.shape) == (64, t.args.head_dim // 2)
    out = llama.text_completion(["the llama"], max_gen_len=4, temperature=0)
    assert isinstance(out[0]["generation"], str)


def test_a_declared_context_past_the_cap_is_refused_before_allocation(tiny_checkpoints, tmp_path: Path) -> None:
    t = tiny_checkpoints
    metadata = sentencepiece_gguf_metadata(t.tokenizer)
    path = checkpoints.save_gguf(t.args, t.state_dict, tmp_path / "huge.gguf", tokenizer_metadata=metadata)
    blob = path.read_bytes()
    key = b"llama.context_length"
    at = blob.index(key) + len(key) + 4  # after the key and its uint32 type id
    path.write_bytes(blob[:at] + (2**32 - 1).to_bytes(4, "little") + blob[at + 4:])
    with pytest.raises(CheckpointError, match=f"max_seq_len must be a positive integer <= {MAX_CONTEXT}"):
        checkpoints.load(path)


@pytest.mark.parametrize("field, value", [
    ("dim", "64"), ("dim", True), ("n_layers", 0), ("n_heads", 2.0), ("vocab_size", 1 << 30),
    ("max_seq_len", MAX_CONTEXT + 1), ("norm_eps", float("nan")), ("rope_theta", "1e4"), ("tie_embeddings", 1),
    ("rope_scaling", {"factor": "8"}), ("rope_scaling", {"nope": 1}), ("rope_scaling", [1, 2]),
])
def test_model_args_check_every_field(field: str, value: object) -> None:
    base = dict(dim=64, n_layers=2, n_heads=4, vocab_size=100)
    with pytest.raises(ConfigError):
        ModelArgs(**dict(base, **{field: value}))


def _hf_config(tiny_checkpoints) -> dict:
    return config_from_args(tiny_checkpoints.args)


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", "64", "hidden_size must be an integer"),
    ("max_position_embeddings", 10**12, "max_seq_len must be a positive integer"),
    ("sliding_window", "4096", "sliding_window must be an integer or null"),
    ("rms_norm_eps", "1e-5", "rms_norm_eps must be an integer or a number"),
    ("quantization_config", "gptq", "quantization_config must be an object"),
    ("rope_scaling", {"rope_type": "llama3", "factor": "8"}, "factor must be a finite number"),
    ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false"),
])
def test_wrong_config_json_values_name_the_key(tiny_checkpoints, key: str, value: object, message: str) -> None:
    config = dict(_hf_config(tiny_checkpoints), **{key: value})
    with pytest.raises(CheckpointError, match=message):
        args_from_config(config, "model")


def test_unparsable_config_files_are_checkpoint_errors(tmp_path: Path) -> None:
    for name, text in {"deep": "[" * 100_000 + "]" * 100_000, "digits": '{"a": ' + "9" * 5000 + "}",
                       "bad": '{"a": ', "list": "[1]"}.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match="config.json"):
            read_config(folder)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(sorted(CONFIG_TYPES) + ["rope_type"]), JSON_VALUES, max_size=4))
def test_fuzzed_config_json_is_a_checkpoint_error_or_valid_args(changes: dict) -> None:
    config = dict(config_from_args(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=100)), **changes)
    try:
        args = args_from_config(config, "fuzz")
    except LlamaforgeError:
        return
    assert isinstance(args, ModelArgs)


@settings(max_examples=200, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(sorted(PARAM_TYPES)), JSON_VALUES, max_size=4))
def test_fuzzed_params_json_is_a_checkpoint_error_or_valid_args(tmp_path_factory, changes: dict) -> None:
    params = dict({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 100}, **changes)
    folder = tmp_path_factory.mktemp("params")
    (folder / "params.json").write_text(json.dumps(params))
    try:
        args = args_from_params(checkpoints.meta.read_params(folder), 100, str(folder))
    except LlamaforgeError:
        return
    assert isinstance(args, ModelArgs)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_safetensors_header_is_a_checkpoint_error_or_loads(tiny_checkpoints, tmp_path_factory,
                                                                  data: st.DataObject) -> None:
    folder = tmp_path_factory.mktemp("hf")
    for f in tiny_checkpoints.hf.iterdir():
        shutil.copy(f, folder / f.name)
    shard = sorted(folder.glob("*.safetensors"))[0]
    blob = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(blob[:8], "little")
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, header - 1))] = data.draw(st.integers(0, 255))
    shard.write_bytes(bytes(blob))
    try:
        checkpoints.load(folder, progress=False)
    except LlamaforgeError:
        pass
