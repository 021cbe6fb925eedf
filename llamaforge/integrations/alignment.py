"""Align a model's tokens with the words of a text (spaCy tokens), by character offsets.

The tokenizer has no offset mapping, so offsets are recovered by decoding: the text is encoded
once, as the model would see it, and its ids are fed to the tokenizer's streaming decoder. Each
piece the decoder emits is the text of the ids pushed since the previous piece (several byte tokens
can make one character), so those ids get that piece's character span. This is exact when the
pieces put together give the text back, which holds for byte-level BPE (GPT-2 style, tiktoken) and
for sentencepiece without normalisation. When they do not (a normalising tokenizer: NFKC, lower-
casing, collapsed spaces), the words are encoded one by one with their trailing whitespace and the
ids joined, which aligns by construction at the price of a tokenization the model did not train on.

A word is then represented by every model token whose span overlaps it; a token that spans two
words (a BPE merge across a spaCy split) counts for both. Nothing here imports torch or spaCy.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

Span = Tuple[int, int]  # [start, end) in characters


def model_token_spans(tokenizer, ids: Sequence[int]) -> Tuple[List[Span], str]:
    """Character span of each id in the text the ids decode to, and that text.

    Ids that emit nothing on their own (the first bytes of a multi-byte character) get the span of
    the piece that completes them.
    """
    decoder = tokenizer.stream_decoder()
    spans: List[Span] = []
    pending = 0  # ids pushed since the last emitted piece
    pos = 0
    pieces: List[str] = []
    for token_id in ids:
        piece = decoder.push(token_id)
        pending += 1
        if piece:
            spans.extend([(pos, pos + len(piece))] * pending)
            pieces.append(piece)
            pos += len(piece)
            pending = 0
    tail = decoder.flush()
    if pending:
        spans.extend([(pos, pos + len(tail))] * pending)
        pieces.append(tail)
    return spans, "".join(pieces)


def encode_aligned(tokenizer, text: str, words: Sequence[Tuple[str, str]]) -> Tuple[List[int], List[Span]]:
    """Token ids for `text` (no BOS) and each id's character span in `text`.

    Args:
        tokenizer: a llamaforge Tokenizer.
        text: the whole text.
        words: (word text, trailing whitespace) pairs that put together give `text` (spaCy's
            `token.text`, `token.whitespace_`); used only when decoding does not give `text` back.

    Returns:
        (ids, spans): spans[k] is the [start, end) character range of ids[k] in `text`.
    """
    ids = tokenizer.encode(text, bos=False, eos=False)
    spans, decoded = model_token_spans(tokenizer, ids)
    if decoded == text:
        return ids, spans
    ids, spans = [], []
    start = end = 0  # the next span starts at `start`; `end` is where the current piece ends
    for word, space in words:
        piece = word + space
        piece_ids = tokenizer.encode(piece, bos=False, eos=False)
        end += len(piece)
        if piece_ids:
            ids.extend(piece_ids)
            spans.extend([(start, end)] * len(piece_ids))
            start = end
        elif spans:
            # a piece the tokenizer drops (extra whitespace): the previous word's ids cover it too
            first = _group_start(spans)
            spans[first:] = [(spans[-1][0], end)] * (len(spans) - first)
            start = end
        # else: nothing before it either; the next word's span starts at `start` and covers it
    return ids, spans


def _group_start(spans: List[Span]) -> int:
    """Index of the first of the trailing ids that share the last span."""
    k = len(spans) - 1
    while k > 0 and spans[k - 1] == spans[-1]:
        k -= 1
    return k


def overlaps(word_spans: Sequence[Span], token_spans: Sequence[Span]) -> List[List[int]]:
    """For each word span, the indices of the token spans that overlap it.

    Both lists are sorted by start and do not overlap among themselves (a text's words, a text's
    tokens); a token overlaps a word when they share at least one character.
    """
    result: List[List[int]] = []
    first = 0  # tokens before `first` end before the current word starts
    n = len(token_spans)
    for start, end in word_spans:
        while first < n and token_spans[first][1] <= start:
            first += 1
        hits = []
        k = first
        while k < n and token_spans[k][0] < end:
            if token_spans[k][1] > start:
                hits.append(k)
            k += 1
        result.append(hits)
    return result
