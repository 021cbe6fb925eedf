"""llama.cpp's pre-tokenizer table (tokenizers/gguf_pretok.py): every entry loads in `tokenizers`.

deepseek-llm's letter class lists Unicode singletons (U+1F7D, U+1FBE, U+1FD3, U+1FDB, U+2126, U+212A)
that NFC normalisation silently replaces; the replaced class was refused by Oniguruma ("empty range in
char class"), so no deepseek-llm vocabulary loaded.
"""

from __future__ import annotations

import pytest
from tokenizers import Regex, pre_tokenizers

from llamaforge.tokenizers.gguf_pretok import PRE_TOKENIZERS
from llamaforge.tokenizers.gguf_vocab import build_gguf_vocab


@pytest.mark.parametrize("name", sorted(PRE_TOKENIZERS))
def test_every_pre_tokenizer_compiles(name: str) -> None:
    for regex in PRE_TOKENIZERS[name].regexes:
        pre_tokenizers.Split(Regex(regex), behavior="isolated")


def test_deepseek_llm_vocabulary_loads_and_splits_as_llama_cpp() -> None:
    letters = PRE_TOKENIZERS["deepseek-llm"].regexes[1]
    for singleton in "\u1f7d\u1fbe\u1fd3\u1fdb\u2126\u212a":
        assert singleton in letters, hex(ord(singleton))
    split = pre_tokenizers.Split(Regex(letters), behavior="isolated")
    # the Kelvin sign starts the range K..ℭ (U+212A..U+212D); normalised to "K", that range took in "[", "_"...
    assert [p for p, _ in split.pre_tokenize_str("ab[cd_ef \u1f7d\u2126")] == ["ab", "[", "cd", "_", "ef", " \u1f7d\u2126"]
    tokens = [chr(c) for c in range(0x21, 0x7F)] + ["Ġ"]
    vocab = build_gguf_vocab({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-llm",
                              "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": []}, "deepseek.gguf")
    ids = vocab.tokenizer.encode("a[b 1").ids
    assert [tokens[i] for i in ids] == ["a", "[", "b", "Ġ", "1"]
