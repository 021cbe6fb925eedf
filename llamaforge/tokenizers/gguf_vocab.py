"""GGUF vocabularies: read the metadata, rebuild the tokenizer llama.cpp runs.

A GGUF file carries no tokenizer file, only llama.cpp's metadata keys (`tokenizer.ggml.*`). This
module turns those into a Hugging Face `tokenizers.Tokenizer` that gives the ids llama.cpp's
tokenizer (`src/llama-vocab.cpp`) gives:

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE. The tokens and merges go into a BPE model; the
  text is split with the regexes llama.cpp picks for `tokenizer.ggml.pre` (see `gguf_pretok`), then
  mapped to the byte alphabet (`ByteLevel`).
- `tokenizer.ggml.model == "llama"`: sentencepiece-style BPE over scores. llama.cpp merges, again
  and again, the adjacent pair whose concatenation is the vocabulary piece with the highest score.
  A BPE model whose merges are every (left, right) split of every piece, ranked by the piece's
  score, does the same (as transformers' GGUF converter does). Spaces become "▁", one "▁" is put
  before each stretch of text when `add_space_prefix` (llama.cpp does this at the start and after
  every special token, as the `Prepend` normalizer does per segment), and characters the
  vocabulary lacks fall back to `<0xNN>` byte tokens.

Token types decide what is special: control (3) and unknown (2) tokens are matched in text only
when the caller allows special tokens; user-defined (4) tokens are always matched whole, as
llama.cpp does; unused (5) and byte (6) tokens are never produced from text by name.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llamaforge.errors import TokenizerError
from llamaforge.tokenizers.gguf_pretok import PRE_TOKENIZERS

logger = logging.getLogger(__name__)

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Token texts llama.cpp treats as "end of generation" whatever their stored type (it forces them to
# control); the subset that names the end of a turn, in the order we prefer for `eot_id`.
EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<|end_of_text|>", "<EOT>", "<end_of_utterance>",
)  # fmt: skip
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>")


# --------------------------------------------------------------------------- metadata


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a GGUF file's metadata (not its tensors) into a dict of plain python values.

    The file is read and validated by llamaforge's one GGUF reader (`checkpoints/gguf_reader.py`:
    bounds, counts, the types of the keys read here, duplicates).

    Args:
        path: a `.gguf` file, with or without tensors (a vocabulary-only file works).

    Returns:
        key -> value, e.g. `"tokenizer.ggml.tokens" -> list[str]`, `"llama.context_length" -> int`.

    Raises:
        TokenizerError: the file is missing, not GGUF, truncated or corrupt.
    """
    from llamaforge.checkpoints.gguf_reader import read_gguf
    from llamaforge.errors import CheckpointError

    try:
        return read_gguf(path).metadata
    except CheckpointError as e:
        raise TokenizerError(f"cannot read the GGUF vocabulary: {e}") from e


# --------------------------------------------------------------------------- vocabulary


@dataclass
class GGUFVocab:
    """A GGUF vocabulary rebuilt as a `tokenizers.Tokenizer`, with the facts llama.cpp reads beside it."""

    tokenizer: HFTokenizer
    kind: str  # "gguf-gpt2" | "gguf-llama"
    tokens: list[str]
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    eot_id: int | None
    add_bos: bool
    chat_template: str | None
    special_tokens: dict[str, int]
    chat_templates: dict[str, str] = field(default_factory=dict)  # `tokenizer.chat_template.NAME` ("tool_use")
    stop_ids: set[int] = field(default_factory=set)
    piece_bytes: BytePieces | None = None  # byte-level vocabularies: what each id decodes to


def _get_id(fields: dict[str, Any], key: str, default: int | None, n_tokens: int) -> int | None:
    value = fields.get(key)
    if default is not None and not 0 <= default < n_tokens:
        default = None
    if value is None:
        return default
    if not isinstance(value, int) or not 0 <= value < n_tokens:
        logger.warning("GGUF %s = %r is outside the vocabulary of %d tokens; ignored", key, value, n_tokens)
        return default
    return value


def _ids_of(types: list[int], wanted: tuple[int, ...]) -> list[int]:
    """The ids whose token type is one of `wanted`, in order: `list.index` scans in C from each hit to the next
    (a vocabulary has a few special tokens among 50k-150k normal ones), not a Python loop over every id."""
    ids = []
    for value in wanted:
        i = -1
        try:
            while True:
                i = types.index(value, i + 1)
                ids.append(i)
        except ValueError:
            pass
    return sorted(ids)


def _list(fields: dict[str, Any], key: str, n: int, default: Any, source: str) -> list[Any]:
    value = fields.get(key)
    if value is None:
        return [default] * n
    if not isinstance(value, list) or len(value) < n:
        got = len(value) if isinstance(value, list) else type(value).__name__
        raise TokenizerError(f"{source}: GGUF key {key} should be a list of {n} values (one per token), got {got}")
    return value[:n]


def build_gguf_vocab(fields: dict[str, Any], source: str = "GGUF metadata") -> GGUFVocab:
    """Build the tokenizer a GGUF file's `tokenizer.ggml.*` metadata describes.

    Args:
        fields: metadata as returned by `read_gguf_metadata`.
        source: how to name the origin in error messages (usually the file path).

    Raises:
        TokenizerError: no vocabulary, an unsupported `tokenizer.ggml.model` or `tokenizer.ggml.pre`,
            or inconsistent arrays.
    """
    model = fields.get("tokenizer.ggml.model")
    if model is None:
        raise TokenizerError(f"{source}: no tokenizer.ggml.model key; this GGUF holds no vocabulary")
    if model not in ("gpt2", "llama"):
        raise TokenizerError(
            f"{source}: tokenizer.ggml.model = {model!r} is not supported; "
            "llamaforge reads 'gpt2' (byte-level BPE) and 'llama' (sentencepiece) vocabularies"
        )
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or set(map(type, tokens)) != {str}:
        raise TokenizerError(f"{source}: tokenizer.ggml.tokens is missing or not a list of strings")
    n = len(tokens)
    if "" in tokens:
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp does
    types = list(_list(fields, "tokenizer.ggml.token_type", n, TOKEN_NORMAL, source))
    vocab = dict(zip(tokens, range(n)))
    if len(vocab) < n:
        i = next(i for i, t in enumerate(tokens) if vocab[t] != i)  # the first id of a token that comes again
        raise TokenizerError(f"{source}: duplicate token {tokens[i]!r} in the vocabulary (ids {i} and "
                             f"{tokens.index(tokens[i], i + 1)})")

    # llama.cpp forces end-of-generation tokens to control, whatever the file says
    for t in EOG_TEXTS:
        if vocab.get(t) is not None and types[vocab[t]] in (TOKEN_NORMAL, TOKEN_USER_DEFINED):
            types[vocab[t]] = TOKEN_CONTROL

    if model == "gpt2":
        pre_name = fields.get("tokenizer.ggml.pre") or ""
        if not pre_name:
            logger.warning("%s: no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer", source)
            pre_name = "default"
        pre = PRE_TOKENIZERS.get(pre_name)
        if pre is None:
            raise TokenizerError(
                f"{source}: tokenizer.ggml.pre = {pre_name!r} is not a pre-tokenizer llamaforge knows; "
                f"known: {', '.join(sorted(PRE_TOKENIZERS))}"
            )
        hf = _byte_level_bpe(fields, vocab, source, pre.regexes, pre.ignore_merges)
        kind, add_bos_default = "gguf-gpt2", pre.add_bos
        bos = _get_id(fields, "tokenizer.ggml.bos_token_id", None, n) if pre.has_bos else None
        eos = _get_id(fields, "tokenizer.ggml.eos_token_id", None, n)
    else:
        scores = _list(fields, "tokenizer.ggml.scores", n, 0.0, source)
        add_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
        unk = _get_id(fields, "tokenizer.ggml.unknown_token_id", 0, n)
        hf = _sentencepiece_bpe(tokens, scores, types, vocab, unk, add_prefix, source)
        kind, add_bos_default = "gguf-llama", True
        bos = _get_id(fields, "tokenizer.ggml.bos_token_id", 1, n)
        eos = _get_id(fields, "tokenizer.ggml.eos_token_id", 2, n)

    special = {tokens[i]: i for i in _ids_of(types, (TOKEN_CONTROL, TOKEN_UNKNOWN))}
    user_defined = [tokens[i] for i in _ids_of(types, (TOKEN_USER_DEFINED,))]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    if hf.get_vocab_size(with_added_tokens=True) != n:
        raise TokenizerError(f"{source}: rebuilding the vocabulary of {n} tokens gave a different size")

    eot = _get_id(fields, "tokenizer.ggml.eot_token_id", None, n)
    if eot is None:
        eot = next((special[t] for t in EOT_TEXTS if t in special), None)
    eom = _get_id(fields, "tokenizer.ggml.eom_token_id", None, n)
    stops = {special[t] for t in EOG_TEXTS if t in special}
    stops |= {i for i in (eos, eot, eom) if i is not None}
    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    pad = _get_id(fields, "tokenizer.ggml.padding_token_id", None, n)
    template = fields.get("tokenizer.chat_template")
    return GGUFVocab(
        tokenizer=hf,
        kind=kind,
        tokens=tokens,
        bos_id=bos,
        eos_id=eos,
        pad_id=-1 if pad is None else pad,
        eot_id=eot,
        add_bos=add_bos_default if add_bos is None else bool(add_bos),
        chat_template=template if isinstance(template, str) and template else None,
        chat_templates=named_templates(fields),
        special_tokens=special,
        stop_ids=stops,
        piece_bytes=_byte_level_pieces(tokens, types) if model == "gpt2" else None,
    )


NAMED_TEMPLATE = "tokenizer.chat_template."


def named_templates(fields: dict[str, Any]) -> dict[str, str]:
    """The named chat templates of GGUF metadata, `tokenizer.chat_template.NAME` (as gguf-py writes a
    tokenizer_config.json list: every name but "default", which is `tokenizer.chat_template`), NAME -> template;
    llama.cpp reads `tokenizer.chat_template.tool_use`."""
    return {key[len(NAMED_TEMPLATE):]: value for key, value in fields.items()
            if key.startswith(NAMED_TEMPLATE) and len(key) > len(NAMED_TEMPLATE) and isinstance(value, str) and value}


class BytePieces:
    """What llama.cpp's `token_to_piece` gives for each id of a byte-level vocabulary, spelled when first asked.

    Normal tokens are spelled in GPT-2's byte alphabet; control, user-defined and unknown tokens are their
    text as it stands. Spelling all of a 50k vocabulary costs ~0.02 s of the load; a decode asks for a few
    ids, so each is spelled on first use and kept (two threads spelling one id write the same bytes).
    Indexing, `len` and iteration are a list's.
    """

    __slots__ = ("_tokens", "_types", "_spelled")

    def __init__(self, tokens: list[str], types: list[int]) -> None:
        self._tokens, self._types = tokens, types
        self._spelled: list[bytes | None] = [None] * len(tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def __getitem__(self, i: int) -> bytes:
        piece = self._spelled[i]
        if piece is None:
            piece = self._spelled[i] = _spell(self._tokens[i], self._types[i])
        return piece

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (self[i] for i in range(len(self)))

    def __getstate__(self) -> tuple[list[str], list[int]]:
        return self._tokens, self._types

    def __setstate__(self, state: tuple[list[str], list[int]]) -> None:
        self.__init__(*state)  # type: ignore[misc]


def _byte_level_pieces(tokens: list[str], types: list[int]) -> BytePieces:
    """The byte pieces of a byte-level vocabulary (`BytePieces`: each spelled when first asked)."""
    return BytePieces(tokens, types)


_LITERAL = (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN)


def _spell(token: str, token_type: int) -> bytes:
    # Each alphabet character becomes the Latin-1 character of its byte, each other character below U+0100
    # the Latin-1 spelling of its UTF-8 bytes, and `latin-1` encoding then gives the bytes (the error handler
    # spells the characters above U+00FF in UTF-8): one C-level pass per token, not a generator per character.
    if token_type in _LITERAL:
        return token.encode("utf-8")
    return token.translate(_byte_alphabet_table()).encode("latin-1", _UTF8_BEYOND_LATIN1)


_UTF8_BEYOND_LATIN1 = "llamaforge-utf8-beyond-latin1"


@functools.lru_cache(maxsize=1)
def _byte_alphabet_table() -> dict[int, str]:
    """`str.translate` table: GPT-2 alphabet character -> chr(its byte); other chars < 256 -> their UTF-8 bytes."""
    import codecs

    from llamaforge.tokenizers.backends import bytes_to_unicode

    try:
        codecs.lookup_error(_UTF8_BEYOND_LATIN1)
    except LookupError:
        codecs.register_error(_UTF8_BEYOND_LATIN1, lambda e: (
            e.object[e.start:e.end].encode("utf-8").decode("latin-1"), e.end))
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    table = {c: chr(c).encode("utf-8").decode("latin-1") for c in range(256) if chr(c) not in to_byte}
    table.update({ord(c): chr(b) for c, b in to_byte.items()})
    return table


def _byte_level_bpe(
    fields: dict[str, Any], vocab: dict[str, int], source: str, regexes: tuple[str, ...], ignore_merges: bool
) -> HFTokenizer:
    raw = fields.get("tokenizer.ggml.merges")
    if not isinstance(raw, list):
        raise TokenizerError(f"{source}: a 'gpt2' vocabulary needs tokenizer.ggml.merges, which is missing")
    merges = split_merges(raw, source)
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, dropout=None)
    except Exception as e:
        raise TokenizerError(f"{source}: the merges do not fit the vocabulary ({e})") from e
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    return hf


def split_merges(raw: list[str], source: str) -> list[tuple[str, str]]:
    """GGUF merges ("left right") as (left, right) pairs, split where llama.cpp splits them: at the first space
    after the first character.

    Where no merge starts with a space (every real vocabulary: a byte-level alphabet spells spaces "Ġ") that is
    the first space, and `str.split` finds it in C: 49k merges in ~9 ms, against ~17 ms for a Python loop.
    """
    if not any(map(str.startswith, raw, itertools.repeat(" "))):
        merges = [tuple(m.split(" ", 1)) for m in raw]
        if all(map((2).__eq__, map(len, merges))):
            return merges  # type: ignore[return-value]
    pairs = []
    for m in raw:
        pos = m.find(" ", 1)
        if pos < 0:
            raise TokenizerError(f"{source}: merge {m!r} has no space separating its two halves")
        pairs.append((m[:pos], m[pos + 1 :]))
    return pairs


MAX_MERGE_WORK = 1 << 28  # character comparisons sentencepiece_merges may do (seconds, not hours)


def sentencepiece_merges(tokens: list[str], scores: list[float], mergeable: list[bool]) -> list[tuple[str, str]]:
    """Merges that make BPE reproduce sentencepiece/llama.cpp score-ordered merging.

    For every mergeable piece, every split into two mergeable pieces is a merge; merges are ranked
    by the piece's score, best first (ties: lower id first, then the longer left half). Trying every
    split of a piece of n characters costs n^2: the sum over the vocabulary is bounded by
    MAX_MERGE_WORK (real vocabularies need 1-30M), so a file of a few huge tokens cannot stall loading.

    Raises:
        TokenizerError: the vocabulary's pieces are too long to rebuild.
    """
    index = {t: i for i, (t, ok) in enumerate(zip(tokens, mergeable)) if ok}
    work = sum(len(t) ** 2 for t in index)
    if work > MAX_MERGE_WORK:
        longest = max(index, key=len)
        raise TokenizerError(
            f"the vocabulary's pieces are too long to rebuild its merges (sum of squared lengths {work} > "
            f"{MAX_MERGE_WORK}; the longest, id {index[longest]}, has {len(longest)} characters)"
        )
    ranked = []
    for piece, i in index.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in index and right in index:
                ranked.append((-float(scores[i]), i, -cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_bpe(
    tokens: list[str],
    scores: list[float],
    types: list[int],
    vocab: dict[str, int],
    unk: int | None,
    add_prefix: bool,
    source: str,
) -> HFTokenizer:
    mergeable = [ty in (TOKEN_NORMAL, TOKEN_USER_DEFINED) for ty in types]
    merges = sentencepiece_merges(tokens, scores, mergeable)
    has_bytes = all(f"<0x{b:02X}>" in vocab for b in range(256))
    try:
        bpe = models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=tokens[unk] if unk is not None else None,
            fuse_unk=True,
            byte_fallback=has_bytes,
            dropout=None,
        )
    except Exception as e:
        raise TokenizerError(f"{source}: cannot build a BPE model from the vocabulary ({e})") from e
    hf = HFTokenizer(bpe)
    steps = [normalizers.Prepend("▁")] if add_prefix else []
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    hf.pre_tokenizer = None
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(dec)
    return hf
