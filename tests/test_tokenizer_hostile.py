"""A hostile tokenizer.json: what its back-end library does wrong on a text is a TokenizerError.

A pre-tokenizer regex with nested quantifiers makes Oniguruma give up ("retry-limit-in-match"), and
the `tokenizers` library then panics: a pyo3 PanicException, a BaseException that no `except Exception`
catches.
"""

from __future__ import annotations

import pytest
from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llamaforge.errors import TokenizerError
from llamaforge.tokenizer import Tokenizer


def test_a_backtracking_regex_is_a_tokenizer_error(tmp_path) -> None:
    hf = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex("(a+)+$"), behavior="isolated")
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.encode("ab") == [0, 1]
    with pytest.raises(TokenizerError, match="panicked.*backtracks"):
        tok.encode("a" * 40 + "b")
