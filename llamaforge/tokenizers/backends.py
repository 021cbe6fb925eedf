"""The three tokenizer libraries behind one small interface.

Every back-end answers the same six questions: encode text (special-token strings in it either
kept as text or mapped to their ids), decode ids, the vocabulary size, the piece <-> id maps, and the
bytes a token stands for in decoded text (by its library's own rule: sentencepiece's "▁" meta symbol and
byte pieces, tiktoken's token bytes, a tokenizer.json's byte-level or byte-fallback decoder).
BOS/EOS handling, id validation and everything model-specific live in `llamaforge.tokenizer`.

- `SentencePieceBackend`: Llama 1/2 `tokenizer.model`; `encode` is `SentencePieceProcessor.encode`.
- `TiktokenBackend`: Llama 3 `tokenizer.model`; `encode` is Meta's llama3 `Tokenizer.encode`
  (chunks of at most 400k characters and 25k consecutive (non-)whitespace characters).
- `HFBackend`: a `tokenizers.Tokenizer` (a `tokenizer.json`, or a GGUF vocabulary rebuilt as one);
  special added tokens are only matched when asked (`encode_special_tokens`). The thinking tags
  (`THINK_TAGS`), which Qwen3's and DeepSeek-R1's files add as *non-special* tokens (so `tokenizers` would
  match them in any text), are control tokens here too: a caller's "<think>" stays text.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any, Protocol, Sequence

from llamaforge.errors import TokenizerError


def guarded(fn: Any, *args: Any, what: str) -> Any:
    """Call a tokenizer library; its failures (a Rust panic too, e.g. a tokenizer.json regex that hits
    Oniguruma's backtracking limit) become a TokenizerError."""
    try:
        return fn(*args)
    except TokenizerError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the back-end library raises
        raise TokenizerError(f"{what} failed on this text ({type(exc).__name__}: {str(exc)[:200]})") from exc
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":  # pyo3's panic derives from BaseException
            raise
        raise TokenizerError(f"{what} failed on this text (the tokenizer library panicked: {str(exc)[:200]}); "
                             "its tokenizer.json may hold a regex that backtracks without end") from exc


class Backend(Protocol):
    """What `Tokenizer` needs from a tokenizer library."""

    n_words: int

    def encode(self, text: str, allow_special: bool) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def id_to_piece(self, token_id: int) -> str: ...

    def token_to_id(self, piece: str) -> int | None: ...

    def token_bytes(self, token_id: int) -> bytes: ...


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # sentencepiece's byte-fallback pieces


def metaspace_bytes(piece: str) -> bytes:
    """Bytes of a sentencepiece-style piece: "<0xAB>" is byte 0xAB, "▁" (the meta symbol) a space."""
    m = _BYTE_PIECE.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) to U+0100 upwards,
    in byte order. Byte-level BPE vocabularies (GPT-2, Llama 3's tokenizer.json, GGUF "gpt2") are
    spelled in this alphabet.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(0x100 + extra)
            extra += 1
    return out


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


# The tags around a reasoning model's thoughts (Qwen3, QwQ, DeepSeek-R1 and its distills), which llama.cpp's and
# Ollama's parsers look for; where a vocabulary holds them as tokens they are control tokens
THINK_TAGS = ("<think>", "</think>")


def special_splitter(specials: dict[str, int]) -> re.Pattern[str] | None:
    """A regex that finds special-token strings, leftmost first and the longest at each position."""
    names = sorted((s for s in specials if s), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, names))) if names else None


def split_specials(text: str, pattern: re.Pattern[str] | None) -> Iterator[tuple[str, bool]]:
    """Yield `(fragment, is_special)` pieces of `text`, splitting out every special-token string."""
    if pattern is None:
        if text:
            yield text, False
        return
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            yield text[pos : m.start()], False
        yield m.group(), True
        pos = m.end()
    if pos < len(text):
        yield text[pos:], False


class SentencePieceBackend:
    """A sentencepiece model (`SentencePieceProcessor`), as Meta's Llama 1/2 tokenizer uses it."""

    def __init__(self, processor: object) -> None:
        sp = processor
        self.sp = sp
        self.n_words: int = sp.vocab_size()  # type: ignore[attr-defined]
        self.special_tokens: dict[str, int] = {
            sp.id_to_piece(i): i  # type: ignore[attr-defined]
            for i in range(self.n_words)
            if sp.is_control(i) or sp.is_unknown(i)  # type: ignore[attr-defined]
        }
        self._pattern = special_splitter(self.special_tokens)

    def encode(self, text: str, allow_special: bool) -> list[int]:
        if not allow_special:
            return list(self.sp.encode(text))  # type: ignore[attr-defined]
        out: list[int] = []
        for frag, is_special in split_specials(text, self._pattern):
            out.extend([self.special_tokens[frag]] if is_special else self.sp.encode(frag))  # type: ignore[attr-defined]
        return out

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)  # type: ignore[attr-defined]

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)  # type: ignore[attr-defined]

    def token_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)  # type: ignore[attr-defined]
        return i if self.sp.id_to_piece(i) == piece else None  # type: ignore[attr-defined]

    def token_bytes(self, token_id: int) -> bytes:
        return metaspace_bytes(self.sp.id_to_piece(token_id))  # type: ignore[attr-defined]


TIKTOKEN_MAX_ENCODE_CHARS = 400_000  # tiktoken panics on longer inputs (Meta's limit)
MAX_NO_WHITESPACES_CHARS = 25_000  # longest run of (non-)whitespace per call (tiktoken issue #195)


def split_runs(text: str, max_run: int) -> Iterator[str]:
    """Cut `text` so no piece holds more than `max_run` consecutive whitespace or non-whitespace chars.

    Same cuts as Meta llama3's `_split_whitespaces_or_nonwhitespaces`: a new piece starts at the
    character that would make the current run one too long.
    """
    start = 0
    run = 0
    in_space = text[0].isspace() if text else False
    for i, ch in enumerate(text):
        space = ch.isspace()
        if space != in_space:
            in_space, run = space, 1
            continue
        run += 1
        if run > max_run:
            yield text[start:i]
            start, run = i, 1
    yield text[start:]


class TiktokenBackend:
    """A `tiktoken.Encoding` driven the way Meta's llama3 `Tokenizer` drives it."""

    def __init__(self, encoding: object, special_tokens: dict[str, int]) -> None:
        self.enc = encoding
        self.n_words: int = encoding.n_vocab  # type: ignore[attr-defined]
        self.special_tokens = dict(special_tokens)
        self._id_to_special = {i: s for s, i in special_tokens.items()}

    def encode(self, text: str, allow_special: bool) -> list[int]:
        allowed: object = "all" if allow_special else set()
        out: list[int] = []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_runs(text[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                out.extend(self.enc.encode(piece, allowed_special=allowed, disallowed_special=()))  # type: ignore[attr-defined]
        return out

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)  # type: ignore[attr-defined]

    def id_to_piece(self, token_id: int) -> str:
        """The token spelled in GPT-2's byte alphabet (as Hugging Face's Llama 3 tokenizer.json does)."""
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        raw: bytes = self.enc.decode_single_token_bytes(token_id)  # type: ignore[attr-defined]
        return "".join(_BYTE_TO_CHAR[b] for b in raw)

    def token_to_id(self, piece: str) -> int | None:
        if piece in self.special_tokens:
            return self.special_tokens[piece]
        try:
            raw = bytes(_CHAR_TO_BYTE[c] for c in piece)
            return self.enc.encode_single_token(raw)  # type: ignore[attr-defined]
        except KeyError:
            return None

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._id_to_special:
            return self._id_to_special[token_id].encode("utf-8")
        return self.enc.decode_single_token_bytes(token_id)  # type: ignore[attr-defined]


class HFBackend:
    """A Hugging Face `tokenizers.Tokenizer`; special added tokens are matched only when allowed.

    `piece_bytes` (one entry per id), when given, replaces the library's decoder: decoding joins the
    tokens' bytes and reads them as UTF-8, which is how llama.cpp detokenizes a GGUF byte-level
    vocabulary (whose user-defined tokens are stored as plain text, not in the byte alphabet).
    """

    def __init__(self, tokenizer: object, piece_bytes: Sequence[bytes] | None = None) -> None:
        self._piece_bytes = piece_bytes
        self._byte_level: bool | None = None  # whether the decoder is byte-level, looked up when first needed
        self._setup(tokenizer)

    def __getstate__(self) -> dict[str, object]:
        # `encode_special_tokens` is not part of a tokenizers.Tokenizer's pickled state: _setup sets it again
        return {"json": self.to_json(), "piece_bytes": self._piece_bytes}

    def to_json(self, pretty: bool = False) -> str:
        """The tokenizer.json of this vocabulary, with the added tokens' flags as its file had them."""
        text = self.with_special.to_str(pretty=pretty)  # type: ignore[attr-defined]
        if not self._plain_tags:
            return text
        import json

        spec = json.loads(text)
        plain = {t.content for t in self._plain_tags}
        for entry in spec.get("added_tokens", []):
            if entry.get("content") in plain:
                entry["special"] = False
        return json.dumps(spec, indent=2 if pretty else None, ensure_ascii=False)

    def __setstate__(self, state: dict[str, object]) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._piece_bytes = state["piece_bytes"]  # type: ignore[assignment]
        self._byte_level = None
        self._setup(HFTokenizer.from_str(state["json"]))  # type: ignore[arg-type]

    def _setup(self, tokenizer: object) -> None:
        if not hasattr(tokenizer, "encode_special_tokens"):
            raise TokenizerError(
                "this version of the `tokenizers` library cannot keep special tokens out of user text; "
                "install tokenizers>=0.19"
            )
        from tokenizers import AddedToken

        # the thinking tags, added as plain tokens by their files, become special (the file's flags are kept for
        # `to_json`), so that text only maps to them where a chat template writes them
        self._plain_tags = [t for t in tokenizer.get_added_tokens_decoder().values()  # type: ignore[attr-defined]
                            if t.content in THINK_TAGS and not t.special]
        if self._plain_tags:
            tokenizer.add_special_tokens([AddedToken(  # type: ignore[attr-defined]
                t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip, normalized=t.normalized,
                special=True) for t in self._plain_tags])
        self.with_special = tokenizer
        self.with_special.encode_special_tokens = False  # type: ignore[attr-defined]
        # `encode_special_tokens` is switched on around an encode of plain text, under this lock (a second copy
        # of the tokenizer with it on would cost ~35 MiB and 0.1 s to build for a 50k-token vocabulary)
        self._encode_lock = threading.Lock()
        self.n_words: int = tokenizer.get_vocab_size(with_added_tokens=True)  # type: ignore[attr-defined]
        self.special_tokens: dict[str, int] = {
            tok.content: i
            for i, tok in tokenizer.get_added_tokens_decoder().items()  # type: ignore[attr-defined]
            if tok.special
        }

    def encode(self, text: str, allow_special: bool) -> list[int]:
        tok = self.with_special
        with self._encode_lock:
            if allow_special:
                return tok.encode(text, add_special_tokens=False).ids  # type: ignore[attr-defined]
            tok.encode_special_tokens = True  # type: ignore[attr-defined]
            try:
                return tok.encode(text, add_special_tokens=False).ids  # type: ignore[attr-defined]
            finally:
                tok.encode_special_tokens = False  # type: ignore[attr-defined]

    def decode(self, ids: list[int]) -> str:
        if self._piece_bytes is not None:
            table = self._piece_bytes
            return b"".join([table[i] for i in ids]).decode("utf-8", errors="replace")
        return self.with_special.decode(ids, skip_special_tokens=False)  # type: ignore[attr-defined]

    def id_to_piece(self, token_id: int) -> str:
        piece = self.with_special.id_to_token(token_id)  # type: ignore[attr-defined]
        if piece is None:
            raise TokenizerError(f"token id {token_id} has no piece in this vocabulary")
        return piece

    def token_to_id(self, piece: str) -> int | None:
        return self.with_special.token_to_id(piece)  # type: ignore[attr-defined]

    def token_bytes(self, token_id: int) -> bytes:
        if self._piece_bytes is not None:
            return self._piece_bytes[token_id]
        piece = self.id_to_piece(token_id)
        if self._byte_level is None:
            self._byte_level = _has_byte_level_decoder(self.with_special)
        if self._byte_level:
            try:
                return bytes(_CHAR_TO_BYTE[c] for c in piece)
            except KeyError:  # an added token written as plain text
                return piece.encode("utf-8")
        return metaspace_bytes(piece)


def _has_byte_level_decoder(tokenizer: object) -> bool:
    """Whether a tokenizers.Tokenizer decodes with GPT-2's byte alphabet (a ByteLevel decoder, alone or in a
    Sequence), as opposed to a sentencepiece-style one (Metaspace / Replace("▁") + ByteFallback)."""
    import json

    def walk(node: object) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(json.loads(tokenizer.to_str()).get("decoder"))  # type: ignore[attr-defined]
