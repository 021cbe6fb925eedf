"""One tokenizer class over sentencepiece, tiktoken and Hugging Face `tokenizers`.

`Tokenizer.from_file(path)` reads a Llama 1/2 sentencepiece `tokenizer.model`, a Llama 3 tiktoken
`tokenizer.model`, a Hugging Face `tokenizer.json` (with its `tokenizer_config.json`), a GGUF file
(vocabulary-only files too) or a directory holding one of them; the kind is recognised from the
file's contents (see `llamaforge.tokenizers.loaders`). `Tokenizer.from_gguf_metadata(fields)`
builds one from GGUF metadata a checkpoint loader has already read.

Encoding follows the reference of each kind: `SentencePieceProcessor.encode` (Meta's Llama 2),
Meta llama3's tiktoken `Tokenizer.encode`, `tokenizers.Tokenizer.encode(add_special_tokens=False)`,
and llama.cpp for GGUF vocabularies. Text is never parsed into control tokens ("<|eot_id|>",
"<|im_end|>", "<s>" stay text) unless `allow_special=True`, which chat templates need.

Decoding returns special tokens as their text, except for sentencepiece models, where it is
`SentencePieceProcessor.decode` exactly as Meta's Llama 2 (control tokens decode to "").
`StreamDecoder` turns ids into text one at a time without splitting a UTF-8 character.

No torch here.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional, Protocol

from llamaforge.errors import TokenizerError
from llamaforge.tokenizers.backends import guarded
from llamaforge.tokenizers.gguf_vocab import read_gguf_metadata
from llamaforge.tokenizers.loaders import Loaded, from_gguf_metadata, load

__all__ = ["Tokenizer", "TokenizerSource", "StreamDecoder", "read_gguf_metadata"]


class TokenizerSource(Protocol):
    """Which tokenizer goes with a checkpoint (`llamaforge.checkpoints.Checkpoint.tokenizer_source` is one).

    checkpoint: the checkpoint's path, for messages.
    file: a tokenizer file found with the checkpoint (tokenizer.model / tokenizer.json), or None.
    gguf_metadata: the GGUF metadata the checkpoint carries its vocabulary in, or None.
    """

    checkpoint: Path
    file: Optional[Path]
    gguf_metadata: Optional[dict[str, Any]]


class Tokenizer:
    """Text <-> token ids for a Llama-family model, whatever file the vocabulary came from.

    Attributes:
        n_words: vocabulary size (ids are `0 .. n_words - 1`).
        bos_id, eos_id: beginning/end-of-sequence ids, or None where the vocabulary has none.
        pad_id: padding id, -1 when none (as Meta's tokenizers).
        eot_id: the end-of-turn id ("<|eot_id|>", "<|im_end|>", ...) or None.
        stop_ids: ids that end a generation: EOS plus end-of-turn tokens.
        add_bos: whether the model expects BOS at the start of a prompt.
        chat_template: the model's Jinja chat template, or None.
        chat_templates: its named templates beside that default (tokenizer_config.json's list, GGUF's
            `tokenizer.chat_template.NAME`), name -> template; "tool_use" is the one for requests with tools.
        kind: "sentencepiece" | "tiktoken" | "hf" | "gguf-gpt2" | "gguf-llama".
        special_tokens: strings that map to ids only with `allow_special=True` -> their ids.
        special_ids: ids of control tokens (BOS, EOS, end-of-turn and the other special tokens).
    """

    def __init__(self, loaded: Loaded, source: str | None = None) -> None:
        """Wrap a loaded back-end; use `from_file` or `from_gguf_metadata` rather than this."""
        self._backend = loaded.backend
        self.source = source
        self.kind: str = loaded.kind
        self.n_words: int = loaded.backend.n_words
        self.bos_id: int | None = loaded.bos_id
        self.eos_id: int | None = loaded.eos_id
        self.pad_id: int = loaded.pad_id
        self.eot_id: int | None = loaded.eot_id
        self.add_bos: bool = bool(loaded.add_bos)
        self.chat_template: str | None = loaded.chat_template
        self.chat_templates: dict[str, str] = dict(loaded.chat_templates)
        self.special_tokens: dict[str, int] = dict(loaded.special_tokens)
        stops = {i for i in (self.eos_id, self.eot_id) if i is not None} | set(loaded.extra_stop_ids)
        self.stop_ids: frozenset[int] = frozenset(i for i in stops if 0 <= i < self.n_words)
        specials = set(self.special_tokens.values()) | {i for i in (self.bos_id, self.eos_id, self.eot_id)
                                                         if i is not None}
        self.special_ids: frozenset[int] = frozenset(i for i in specials if 0 <= i < self.n_words)
        self._bytes_table: tuple[bytes, ...] | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer file or a directory holding one.

        Args:
            path: a sentencepiece or tiktoken `tokenizer.model`, a `tokenizer.json`, a `.gguf` file, or a
                directory with one of them (tokenizer.json preferred, then tokenizer.model, then a
                single GGUF file).

        Raises:
            TokenizerError: the path is missing, or the file is truncated, corrupt or of no known kind.
        """
        loaded, file = load(path)
        return cls(loaded, source=str(file))

    @classmethod
    def from_gguf_metadata(cls, fields: dict[str, Any], source: str | None = None) -> Tokenizer:
        """Build the tokenizer a GGUF file's metadata describes (see `read_gguf_metadata`).

        Args:
            fields: metadata key -> python value, e.g. "tokenizer.ggml.tokens" -> list[str].
            source: where the metadata came from, for error messages.
        """
        return cls(from_gguf_metadata(fields, source or "GGUF metadata"), source=source)

    @classmethod
    def from_source(
        cls, source: TokenizerSource, tokenizer_path: str | os.PathLike[str] | None = None, *,
        hint: str = "tokenizer_path",
    ) -> Tokenizer:
        """The tokenizer of a checkpoint: `tokenizer_path` when given, else the one the checkpoint carries
        (its GGUF vocabulary, or the tokenizer file found beside it). The one place this choice is made.

        Args:
            source: the checkpoint's `tokenizer_source`.
            tokenizer_path: an explicit tokenizer file (or folder), which wins.
            hint: how the caller's user names `tokenizer_path` ("--tokenizer_path", ...), for the error.

        Raises:
            TokenizerError: the checkpoint carries no tokenizer and none was given.
        """
        if tokenizer_path is not None:
            return cls.from_file(tokenizer_path)
        if source.gguf_metadata is not None:
            return cls.from_gguf_metadata(source.gguf_metadata, source=str(source.checkpoint))
        if source.file is not None:
            return cls.from_file(source.file)
        raise TokenizerError(
            f"{source.checkpoint} carries no tokenizer; give one (tokenizer.model or tokenizer.json) with {hint}"
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, n_words={self.n_words}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, source={self.source!r})"
        )

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Encode text to token ids.

        Args:
            text: the text. Special-token strings in it stay text unless `allow_special`.
            bos: prepend `bos_id`.
            eos: append `eos_id`.
            allow_special: map special-token strings in `text` (see `special_tokens`) to their ids.

        Returns:
            The ids.

        Raises:
            TokenizerError: `text` is not a str, or BOS/EOS is asked for and the vocabulary has none.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800") is not text any library can encode
            raise TokenizerError(
                f"cannot encode this text: {exc.reason} at position {exc.start}; it must be valid Unicode"
            ) from None
        ids = guarded(self._backend.encode, text, allow_special, what=f"this {self.kind} tokenizer")
        if bos:
            if self.bos_id is None:
                raise TokenizerError(f"bos=True, but this {self.kind} vocabulary has no BOS token")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise TokenizerError(f"eos=True, but this {self.kind} vocabulary has no EOS token")
            ids.append(self.eos_id)
        return ids

    def _check_ids(self, ids: Iterable[Any]) -> list[int]:
        out = []
        for t in ids:
            try:
                i = operator.index(t)
            except TypeError:
                raise TokenizerError(f"token ids must be integers, got {t!r} ({type(t).__name__})") from None
            if not 0 <= i < self.n_words:
                raise TokenizerError(f"token id {i} is outside the vocabulary (0 .. {self.n_words - 1})")
            out.append(i)
        return out

    def decode(self, ids: Sequence[int] | Iterable[int]) -> str:
        """Decode ids to text (special tokens as their text; sentencepiece: as Meta's Llama 2).

        Raises:
            TokenizerError: an id is not an integer or is outside the vocabulary.
        """
        return self._backend.decode(self._check_ids(ids))

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of one id ("▁the", "Ġthe", "<|eot_id|>", "<0x0A>", ...)."""
        (i,) = self._check_ids([token_id])
        return self._backend.id_to_piece(i)

    def token_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary piece, or None if the vocabulary has no such piece."""
        return self._backend.token_to_id(piece)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for in decoded text (a special token: its text), as its back-end defines
        them: what the `bytes` of OpenAI logprobs and a grammar engine's token table need."""
        (i,) = self._check_ids([token_id])
        return self.token_bytes_table()[i]

    def token_bytes_table(self) -> tuple[bytes, ...]:
        """`token_bytes` of every id 0 .. n_words - 1 (computed once; b"" for a hole in the vocabulary)."""
        if self._bytes_table is None:
            out = []
            for i in range(self.n_words):
                try:
                    out.append(self._backend.id_to_piece(i).encode("utf-8") if i in self.special_ids
                               else self._backend.token_bytes(i))
                except (TokenizerError, KeyError, IndexError, ValueError):  # an id with no piece (a hole)
                    out.append(b"")
            self._bytes_table = tuple(out)
        return self._bytes_table

    def stream_decoder(self) -> StreamDecoder:
        """A fresh `StreamDecoder` over this tokenizer."""
        return StreamDecoder(self)

    def save(self, folder: str | os.PathLike[str]) -> list[str]:
        """Write this tokenizer's files into `folder` so that a checkpoint there carries it.

        A sentencepiece or tiktoken model is copied as `tokenizer.model`. A `tokenizers`-backed
        vocabulary (tokenizer.json, or a GGUF vocabulary rebuilt as one) is written as `tokenizer.json`
        plus a `tokenizer_config.json` holding the chat template (a list of named ones where the model has
        them), BOS/EOS tokens and `add_bos_token`.

        Returns:
            The names of the files written.
        """
        import json
        import shutil
        from pathlib import Path

        out = Path(folder)
        hf = getattr(self._backend, "with_special", None)
        if hf is None:
            if not self.source or not Path(self.source).is_file():
                raise TokenizerError(f"cannot save this {self.kind} tokenizer: its source file is unknown")
            shutil.copyfile(self.source, out / "tokenizer.model")
            return ["tokenizer.model"]
        (out / "tokenizer.json").write_text(self._backend.to_json(pretty=True))
        config: dict[str, Any] = {"add_bos_token": self.add_bos, "add_eos_token": False}
        for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
            if token_id is not None:
                config[key] = self._backend.id_to_piece(token_id)
        if self.chat_template and self.chat_templates:  # transformers' list of named templates
            config["chat_template"] = [{"name": "default", "template": self.chat_template}] + [
                {"name": name, "template": t} for name, t in self.chat_templates.items()]
        elif self.chat_template:
            config["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return ["tokenizer.json", "tokenizer_config.json"]


class StreamDecoder:
    """Decode a stream of ids into text pieces, never splitting a UTF-8 character.

    `push(id)` returns the text that became complete with this id (often "", e.g. while the bytes of
    a character arrive one byte token at a time); `flush()` returns what is left. For ordinary text
    the pieces concatenate to `tokenizer.decode(all ids)`.

    Only a small window of ids is decoded per push (as vLLM's and mlx-lm's detokenizers do): the
    ids since the last emitted boundary plus the few before it, whose text is subtracted; decoding
    them with their left context keeps spaces that a decoder strips at the start of a text.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._ids: list[int] = []  # context ids (already emitted) followed by pending ids
        self._read = 0  # _ids[:_read] is context, _ids[_read:] is not emitted yet

    def _pending_text(self) -> tuple[str, str]:
        decode = self.tokenizer._backend.decode
        return decode(self._ids[: self._read]), decode(self._ids)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly "")."""
        (i,) = self.tokenizer._check_ids([token_id])
        self._ids.append(i)
        before, now = self._pending_text()
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        # the ids of this piece become the left context of the next one; older ids are dropped
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return now[len(before) :]

    def flush(self) -> str:
        """Return the text of ids not yet emitted (an incomplete character becomes U+FFFD), and reset."""
        before, now = self._pending_text()
        self._ids, self._read = [], 0
        return now[len(before) :] if len(now) > len(before) else ""
