"""A hostile tokenizer.json: what its back-end library does wrong on a text is a TokenizerError.

A pre-tokenizer regex with nested quantifiers makes Oniguruma give up ("retry-limit-in-match"), and
the `tokenizers` library then panics: a pyo3 PanicException, a BaseException that no `except Exception`
catches. A property test puts random values in tokenizer_config.json and config.json.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llamaforge.chat import chat_format_for
from llamaforge.errors import LlamaforgeError, TokenizerError
from llamaforge.tokenizer import Tokenizer


def test_a_backtracking_regex_is_a_tokenizer_error(tmp_path) -> None:
    hf = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex("(a+)+$"), behavior="isolated")
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.encode("ab") == [0, 1]
    with pytest.raises(TokenizerError, match="panicked.*backtracks"):
        tok.encode("a" * 40 + "b")


CONFIG_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=6) | st.sampled_from(["<s>", "</s>"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=5,
)
TEMPLATES = st.sampled_from(["{{ messages[0]['content'] }}", "{% for %}", "{{ 1/0 }}", "", "{{ bos_token }}x"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tok_config=st.dictionaries(st.sampled_from(["bos_token", "eos_token", "pad_token", "add_bos_token",
                                                    "chat_template"]), CONFIG_VALUES | TEMPLATES, max_size=4),
       model_config=st.dictionaries(st.sampled_from(["bos_token_id", "eos_token_id"]), CONFIG_VALUES, max_size=2))
def test_fuzzed_tokenizer_configs_are_llamaforge_errors_or_load(tmp_path_factory, tok_config, model_config) -> None:
    folder = tmp_path_factory.mktemp("tok")
    hf = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    hf.add_special_tokens(["<s>", "</s>"])
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (folder / "config.json").write_text(json.dumps(model_config))
    try:
        tok = Tokenizer.from_file(folder)
        for i in (tok.bos_id, tok.eos_id, *tok.stop_ids):
            assert i is None or 0 <= i < tok.n_words  # no id outside the vocabulary survives loading
        ids = chat_format_for(tok).encode_dialog([{"role": "user", "content": "ab"}])
        assert all(0 <= i < tok.n_words for i in ids)
    except LlamaforgeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=12), min_size=1, max_size=20))
def test_byte_level_piece_bytes_are_the_per_character_spelling(texts) -> None:
    """`_byte_level_pieces` (one `translate` + `encode` per token, when first asked) spells each normal token character by character:
    alphabet characters as their byte, any other character in UTF-8; control tokens as their UTF-8 text."""
    from llamaforge.tokenizers.backends import bytes_to_unicode
    from llamaforge.tokenizers.gguf_vocab import TOKEN_CONTROL, TOKEN_NORMAL, _byte_level_pieces

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    alphabet = "".join(to_byte)
    texts = texts + [alphabet, "\x00\x7f\xa0\xad\u0100\u0143\u0144é日本🤖"]
    types = [TOKEN_NORMAL] * len(texts) + [TOKEN_CONTROL]
    texts = texts + [alphabet]
    expected = [t.encode("utf-8") if ty == TOKEN_CONTROL else
                b"".join(bytes([to_byte[c]]) if c in to_byte else c.encode("utf-8") for c in t)
                for t, ty in zip(texts, types)]
    assert list(_byte_level_pieces(texts, types)) == expected


def test_a_duplicate_token_and_a_non_string_token_are_named() -> None:
    from llamaforge.tokenizers.gguf_vocab import build_gguf_vocab

    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.merges": [],
              "tokenizer.ggml.tokens": ["a", "b", "c", "b", "a"]}
    with pytest.raises(TokenizerError, match=r"duplicate token 'a' in the vocabulary \(ids 0 and 4\)"):
        build_gguf_vocab(fields)
    with pytest.raises(TokenizerError, match="not a list of strings"):
        build_gguf_vocab({**fields, "tokenizer.ggml.tokens": ["a", 3]})
    eot = build_gguf_vocab({**fields, "tokenizer.ggml.tokens": ["a", "b", "<|eot_id|>"]})
    assert eot.special_tokens == {"<|eot_id|>": 2} and 2 in eot.stop_ids  # forced to control, as llama.cpp does
    assert list(eot.piece_bytes) == [b"a", b"b", b"<|eot_id|>"]
