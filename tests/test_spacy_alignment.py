"""Model tokens <-> spaCy tokens alignment by character offsets (no model weights, no torch work)."""

from __future__ import annotations

import pytest

spacy = pytest.importorskip("spacy")

from llamaforge.integrations.alignment import encode_aligned, model_token_spans, overlaps  # noqa: E402
from llamaforge.tokenizer import Tokenizer  # noqa: E402

TEXTS = [
    "Hello world, naïve café!",
    "Angela Merkel met Emmanuel Macron in Paris.",
    "日本語 and 🤖 emoji, U.S.A. e-mail: a@b.c",
    "Two  spaces,\n\nnew lines\tand a tab.",
    "",
    " leading space",
]


@pytest.fixture(scope="module")
def gpt2_tokenizer(default_gguf) -> Tokenizer:
    return Tokenizer.from_file(default_gguf)


@pytest.fixture(scope="module")
def sp_tokenizer(tiny_checkpoints) -> Tokenizer:
    # trained with sentencepiece's default nmt_nfkc normalisation: collapses repeated spaces
    return Tokenizer.from_file(tiny_checkpoints.tokenizer)


def _check_cover(text: str, spans) -> None:
    """Spans are contiguous, in order, and cover the whole text."""
    pos, prev = 0, None
    for start, end in spans:
        assert start <= end
        assert start == pos or (start, end) == prev  # ids of one multi-byte character share a span
        prev, pos = (start, end), end
    assert pos == len(text)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_bpe_spans_are_exact(gpt2_tokenizer, text):
    ids = gpt2_tokenizer.encode(text)
    spans, decoded = model_token_spans(gpt2_tokenizer, ids)
    assert decoded == text
    assert len(spans) == len(ids)
    got, enc_spans = encode_aligned(gpt2_tokenizer, text, [])
    assert got == ids  # the natural tokenization is kept when decoding gives the text back
    assert enc_spans == spans
    _check_cover(text, spans)
    # every id whose bytes complete characters on their own decodes to exactly its span's text
    whole = 0
    for token_id, (start, end) in zip(ids, spans):
        piece = gpt2_tokenizer.decode([token_id])
        if "\ufffd" not in piece:
            assert piece == text[start:end]
            whole += 1
    assert whole > 0 or not text  # the check above ran (a text of only partial characters would skip it)


@pytest.mark.parametrize("text", TEXTS)
def test_spacy_tokens_all_get_model_tokens(gpt2_tokenizer, sp_tokenizer, text):
    nlp = spacy.blank("en")
    doc = nlp(text)
    for tok in (gpt2_tokenizer, sp_tokenizer):
        ids, spans = encode_aligned(tok, doc.text, [(t.text, t.whitespace_) for t in doc])
        assert len(ids) == len(spans)
        _check_cover(text, spans)
        words = [(t.idx, t.idx + len(t.text)) for t in doc]
        for word, hits in zip(words, overlaps(words, spans)):
            assert hits, f"spaCy token {text[word[0]:word[1]]!r} got no model token ({tok.kind})"
            for k in hits:  # each hit shares a character with the word
                assert spans[k][0] < word[1] and spans[k][1] > word[0]


def test_normalising_tokenizer_falls_back_to_word_by_word(sp_tokenizer):
    text = "Two  spaces and the ﬁ ligature."
    ids = sp_tokenizer.encode(text)
    _, decoded = model_token_spans(sp_tokenizer, ids)
    assert decoded != text  # nmt_nfkc changed the text, so decoding cannot give offsets
    doc = spacy.blank("en")(text)
    words = [(t.text, t.whitespace_) for t in doc]
    got, spans = encode_aligned(sp_tokenizer, text, words)
    expected = [i for w, s in words for i in sp_tokenizer.encode(w + s)]
    assert got == expected
    _check_cover(text, spans)


def test_overlaps_handles_tokens_spanning_words():
    # model tokens: "New York" as one token, then " is", then "." ; words: New, York, is, .
    token_spans = [(0, 8), (8, 11), (11, 12)]
    word_spans = [(0, 3), (4, 8), (9, 11), (11, 12)]
    assert overlaps(word_spans, token_spans) == [[0], [0], [1], [2]]
    assert overlaps([], token_spans) == []
    assert overlaps([(0, 3)], []) == [[]]
