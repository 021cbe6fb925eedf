"""The raw bytes of every token, from the tokenizer's public pieces (no torch).

Needed where text is not enough: the `bytes` field of OpenAI logprobs and the token table a grammar
engine works on. Byte-level BPE vocabularies (GPT-2 style: GGUF "gpt2", Llama 3, most tokenizer.json)
spell bytes in GPT-2's printable alphabet; sentencepiece-style ones use "▁" for a space and "<0xAB>"
for byte fallback. Special tokens are their text; `special_ids` says which they are.
"""

from __future__ import annotations

import re
from functools import lru_cache

from llamaforge.tokenizers.backends import bytes_to_unicode

_CHAR_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def is_byte_level(tokenizer) -> bool:
    """True for GPT-2-style byte-level vocabularies, False for sentencepiece-style ones."""
    if tokenizer.kind in ("tiktoken", "gguf-gpt2"):
        return True
    if tokenizer.kind in ("sentencepiece", "gguf-llama"):
        return False
    return tokenizer.token_to_id("▁") is None and tokenizer.token_to_id("Ġ") is not None


def special_ids(tokenizer) -> frozenset[int]:
    """Ids of control tokens (BOS, EOS, end-of-turn, ...)."""
    ids = set(tokenizer.special_tokens.values())
    ids |= {i for i in (tokenizer.bos_id, tokenizer.eos_id, getattr(tokenizer, "eot_id", None)) if i is not None}
    return frozenset(i for i in ids if 0 <= i < tokenizer.n_words)


def piece_bytes(piece: str, byte_level: bool) -> bytes:
    """The bytes a (non-special) vocabulary piece stands for."""
    if byte_level:
        try:
            return bytes(_CHAR_TO_BYTE[c] for c in piece)
        except KeyError:  # an added token written as plain text
            return piece.encode("utf-8")
    m = _BYTE_PIECE.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace("▁", " ").encode("utf-8")


@lru_cache(maxsize=4)
def _table(tokenizer) -> tuple[bytes, ...]:
    byte_level = is_byte_level(tokenizer)
    specials = special_ids(tokenizer)
    out = []
    for i in range(tokenizer.n_words):
        try:
            piece = tokenizer.id_to_piece(i)
        except Exception:  # a hole in the vocabulary
            out.append(b"")
            continue
        out.append(piece.encode("utf-8") if i in specials else piece_bytes(piece, byte_level))
    return tuple(out)


def token_bytes_table(tokenizer) -> tuple[bytes, ...]:
    """Bytes of every token id (computed once per tokenizer)."""
    return _table(tokenizer)


def token_bytes(tokenizer, token_id: int) -> bytes:
    """Bytes of one token."""
    return _table(tokenizer)[token_id]
