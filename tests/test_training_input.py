"""Hostile training input: torn prepared files, binary or deeply nested JSONL, wrong-typed config values.

Each is a ConfigError naming the file/line or the setting, before step 0 (or a recovery), never a
traceback from json, numpy or torch. A hypothesis test puts random TOML-like values under every setting.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaforge.chat import Llama2ChatFormat
from llamaforge.errors import ConfigError, LlamaforgeError
from llamaforge.training.config import LORA_RULES, TRAIN_RULES, LoRAConfig, TrainConfig
from llamaforge.training.corpus import prepare_data
from llamaforge.training.data import TokenFile
from tests.test_training_support import tokenizer, workspace

BASE = dict(data=["x.txt"], tokenizer="t.model", model_args={"dim": 32, "n_layers": 1, "n_heads": 2})


def test_a_torn_prepared_json_is_prepared_again(tmp_path):
    tok = tokenizer()
    corpus = workspace() / "corpus.txt"
    first = prepare_data([corpus], tok, tmp_path, val_fraction=0.2, seed=1, piece_chars=500)
    marker = tmp_path / "prepared.json"
    text = marker.read_text()
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed into place
    for torn in (text[: len(text) // 2], "", "[1, 2]", '{"fingerprint": 3}'):
        marker.write_text(torn)
        again = prepare_data([corpus], tok, tmp_path, val_fraction=0.2, seed=1, piece_chars=500)
        assert again == first and json.loads(marker.read_text()) == json.loads(text)
    (tmp_path / "train.json").write_text('{"dtype": "uint')
    with pytest.raises(ConfigError, match="train.json is unreadable"):
        TokenFile.open(first.train_stem)


@pytest.mark.parametrize("line, message", [
    (b"\xff\xfe\x00binary\x89PNG\n", "d.jsonl:2: not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", "d.jsonl:2: not valid JSON \\(RecursionError"),
    (b'{"text": ' + b"9" * 5000 + b"}\n", "d.jsonl:2: not valid JSON"),
    (b'{"messages": [{"role": "user", "content": {"a": [[[[]]]]}}]}\n', "d.jsonl:2: message 0 must be"),
    (b'{"text": "\\ud800"}\n', "valid Unicode"),
])
def test_hostile_jsonl_lines_name_the_line(tmp_path, line: bytes, message: str):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "the cat."}\n' + line)
    tok = tokenizer()
    with pytest.raises(LlamaforgeError, match=message):
        prepare_data([f], tok, tmp_path / "out", val_fraction=0.0, chat_format=Llama2ChatFormat(tok))


@pytest.mark.parametrize("bad", [
    dict(lr="0.001"), dict(lr=float("nan")), dict(lr=-1), dict(betas=[0.9]), dict(betas=(0.9, 1.5)),
    dict(betas="0.9,0.95"), dict(weight_decay="0.1"), dict(weight_decay=-0.1), dict(seed=-1), dict(seed="1"),
    dict(seed=1.5), dict(lora={"rank": "8"}), dict(lora={"rank": 4, "alpha": "16"}), dict(lora={"dropout": 1}),
    dict(lora={"targets": "wq"}), dict(lora=3), dict(schedule="linear"), dict(export="onnx"), dict(export=1),
    dict(export_dtype="int3"), dict(export_dtype=16), dict(autocast="fp16"), dict(max_steps=True),
    dict(warmup_steps=200, max_steps=100), dict(min_lr=1.0, lr=0.1), dict(model_args={"dim": "32"}),
    dict(model_args={"dim": 32, "n_layers": 1, "n_heads": 2, "wings": 2}), dict(resume="yes"),
    dict(sample_prompts="hi"), dict(val_fraction=1.0), dict(momentum=1.0),
])
def test_every_wrong_setting_is_refused_when_the_config_is_made(bad: dict):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{**BASE, **bad})
    assert any(key.split("_")[0] in str(info.value) for key in bad)


def test_fp16_autocast_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="fp16.*loss scaling.*bf16"):
        TrainConfig(**BASE, autocast="fp16")


def test_every_setting_has_a_rule():
    assert {f.name for f in dataclasses.fields(TrainConfig)} == set(TRAIN_RULES)
    assert {f.name for f in dataclasses.fields(LoRAConfig)} == set(LORA_RULES)


TOML_VALUES = st.recursive(
    st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5,
)


@settings(max_examples=300, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(sorted(TRAIN_RULES)), TOML_VALUES, max_size=3))
def test_fuzzed_training_configs_are_config_errors_or_valid(changes: dict):
    try:
        cfg = TrainConfig(**{**BASE, **changes})
    except ConfigError:
        return
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
