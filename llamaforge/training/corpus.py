"""Training text in, prepared token files out: plain text, JSONL `text`, and JSONL chat `messages`.

Sources are read as streams (a line or a paragraph group at a time), tokenized with the model's
tokenizer, split into train and validation pieces and written with `TokenWriter` (see data.py), so
preparing a corpus never holds it in memory.

- A plain text file is one document (BOS at its start when the model adds BOS, EOS at its end), cut at
  blank lines into pieces of about `piece_chars` characters for the train/validation split.
- A JSONL line `{"text": ...}` is one document.
- A JSONL line `{"messages": [{"role": ..., "content": ...}, ...]}` is one chat example, encoded with
  the model's chat format; only the tokens of the assistant answers (with the token that ends each
  answer) are targets.

Each piece goes to validation with probability `val_fraction`, decided by a generator seeded with
`seed` (at least one piece does when there are two or more), unless validation files are given
(`val_sources`). Prepared files are reused when the
sources, tokenizer and settings are unchanged (a fingerprint in `prepared.json`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from llamaforge.errors import ChatFormatError, ConfigError
from llamaforge.training.data import TokenWriter, read_json_or_none, write_json_atomic

Piece = tuple[list[int], Optional[list[int]]]  # ids, mask (None: every token is a target)


# -- chat examples ----------------------------------------------------------------------------------------

def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _check_chat(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: message {i} must be {{'role': system|user|assistant, 'content': str}}, got {m!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where}: the dialog has no 'assistant' message, so nothing to learn from")
    return [dict(m) for m in messages]


def encode_chat_example(chat_format: Any, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a whole dialog in the model's chat format and a 0/1 mask marking the assistant answers.

    Llama 2 ([INST]) and Llama 3 (header tokens) dialogs are built turn by turn, exactly as their
    `encode_dialog` builds prompts; a Jinja template is rendered for the whole dialog and for each prefix
    that ends just before an assistant answer (with the generation prompt), and the answer is the tokens
    between that prefix and the dialog rendered up to the end of that answer.

    Raises:
        ChatFormatError: the roles do not fit the format, or a prefix does not tokenize as a prefix.
    """
    name = getattr(chat_format, "name", None)
    if name == "llama2":
        return _encode_llama2(chat_format, messages)
    if name == "llama3":
        return _encode_llama3(chat_format, messages)
    full = chat_format.encode_dialog(messages, add_generation_prompt=False)
    mask = [0] * len(full)
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = chat_format.encode_dialog(messages[:k], add_generation_prompt=True)
        upto = chat_format.encode_dialog(messages[:k + 1], add_generation_prompt=False)
        start, end = _common_prefix(prompt, full), _common_prefix(upto, full)
        if end != len(upto) or start >= end:
            raise ChatFormatError(
                f"the chat template does not render dialog prefixes as prefixes of the whole dialog (assistant "
                f"message {k}); it cannot be used for assistant-only loss"
            )
        mask[start:end] = [1] * (end - start)
    return full, mask


def _encode_llama2(fmt: Any, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
    if messages[-1]["role"] != "assistant":
        raise ChatFormatError("a Llama 2 training dialog must end with an 'assistant' message")
    pairs, _ = fmt.turns(list(messages) + [{"role": "user", "content": ""}])  # checks the role order
    enc = fmt.tokenizer.encode
    ids: list[int] = []
    mask: list[int] = []
    for user, answer in pairs:
        prompt = enc(f"[INST] {user.strip()} [/INST]", bos=True, eos=False)
        whole = enc(f"[INST] {user.strip()} [/INST] {answer.strip()} ", bos=True, eos=True)
        start = _common_prefix(prompt, whole)
        ids += whole
        mask += [0] * start + [1] * (len(whole) - start)
    return ids, mask


def _encode_llama3(fmt: Any, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
    sp = fmt.tokenizer.special_tokens
    ids, mask = [sp["<|begin_of_text|>"]], [0]
    for msg in messages:
        header = fmt.encode_header(msg["role"])
        body = fmt.tokenizer.encode(msg["content"].strip()) + [sp["<|eot_id|>"]]
        ids += header + body
        mask += [0] * len(header) + [1 if msg["role"] == "assistant" else 0] * len(body)
    return ids, mask


# -- reading sources --------------------------------------------------------------------------------------

def _text_pieces(path: Path, piece_chars: int) -> Iterator[str]:
    """A text file in pieces of about piece_chars characters, cut at blank lines."""
    buf: list[str] = []
    size = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= piece_chars and not line.strip():
                yield "".join(buf)
                buf, size = [], 0
    if buf:
        yield "".join(buf)


def iter_pieces(path: Path, tokenizer: Any, chat_format: Any = None, piece_chars: int = 16384,
                text_field: str = "text") -> Iterator[Piece]:
    """Tokenized pieces of one source file (see the module docstring)."""
    bos = tokenizer.add_bos and tokenizer.bos_id is not None
    eos = tokenizer.eos_id is not None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for where, record in json_lines(path):
            if isinstance(record, dict) and "messages" in record:
                if chat_format is None:
                    raise ConfigError(f"{where}: chat 'messages' need a tokenizer with a chat format")
                ids, mask = encode_chat_example(chat_format, _check_chat(record["messages"], where))
                yield ids, mask
            elif isinstance(record, dict) and isinstance(record.get(text_field), str):
                yield tokenizer.encode(record[text_field], bos=bos, eos=eos), None
            else:
                raise ConfigError(f"{where}: each JSONL line needs a '{text_field}' string or a 'messages' list")
        return
    pieces = _text_pieces(path, piece_chars)
    current = next(pieces, None)
    first = True
    while current is not None:
        following = next(pieces, None)
        ids = tokenizer.encode(current, bos=bos and first, eos=eos and following is None)
        yield ids, None
        first, current = False, following


# -- preparing splits -------------------------------------------------------------------------------------

@dataclass
class PreparedData:
    """Where the prepared splits are and their sizes."""

    train_stem: Path
    val_stem: Optional[Path]
    n_train_tokens: int
    n_val_tokens: int
    has_mask: bool


def _fingerprint(paths: Sequence[Path], tokenizer: Any, settings: dict) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"{getattr(tokenizer, 'source', None)}|{tokenizer.n_words}|{getattr(tokenizer, 'kind', '')}\n".encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def prepare_data(
    sources: Sequence[str | Path], tokenizer: Any, out_dir: str | Path, *, val_fraction: float = 0.05,
    seed: int = 0, chat_format: Any = None, piece_chars: int = 16384, text_field: str = "text",
    vocab_size: Optional[int] = None, val_sources: Optional[Sequence[str | Path]] = None,
) -> PreparedData:
    """Tokenize `sources` (text or JSONL files, or folders of them) into train/val token files in out_dir.

    Args:
        sources: files or folders (folders: every .txt, .md, .jsonl inside, sorted).
        tokenizer: the model's Tokenizer.
        out_dir: where `train.bin`, `val.bin` (+ `.mask`, `.json`) and `prepared.json` go.
        val_fraction: probability that a piece goes to validation (0 disables validation).
        seed: seeds the split.
        chat_format: the model's chat format, needed for `messages` records.
        vocab_size: the model's vocabulary size (default: the tokenizer's), for the id range check.
        val_sources: files for validation; when given, `val_fraction` is ignored and all of `sources`
            trains.

    Returns:
        PreparedData.
    """
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    paths = _expand(sources)
    val_paths = _expand(val_sources) if val_sources else []
    if val_paths:
        val_fraction = 0.0
    out = Path(out_dir)
    settings = dict(val_fraction=val_fraction, seed=seed, piece_chars=piece_chars, text_field=text_field,
                    val_sources=[str(p) for p in val_paths])
    fp = _fingerprint(paths + val_paths, tokenizer, settings)
    marker = out / "prepared.json"
    if marker.is_file():
        info = read_json_or_none(marker)  # None when torn (a run killed mid-write by an older version)
        if info is not None and info.get("fingerprint") == fp:
            return _prepared_from(out, info)
        marker.unlink()  # stale or torn: the data is prepared again below
    vocab = vocab_size or tokenizer.n_words
    has_mask = any(p.suffix.lower() in (".jsonl", ".ndjson") and _has_messages(p) for p in paths + val_paths)
    rng = np.random.default_rng(seed)
    train = TokenWriter(out / "train", vocab, has_mask)
    val = TokenWriter(out / "val", vocab, has_mask) if val_fraction > 0 or val_paths else None
    held: Optional[Piece] = None  # the first piece, kept back so that validation gets at least one
    n_pieces = n_val = 0
    try:
        for path in paths:
            for ids, mask in iter_pieces(path, tokenizer, chat_format, piece_chars, text_field):
                if has_mask and mask is None:
                    mask = [1] * len(ids)
                n_pieces += 1
                if val_fraction > 0 and held is None:
                    held = (ids, mask)
                    continue
                if val_fraction > 0 and rng.random() < val_fraction:
                    val.append(ids, mask)
                    n_val += 1
                else:
                    train.append(ids, mask)
        if held is not None:
            (val if n_val == 0 and n_pieces > 1 else train).append(*held)
        for path in val_paths:
            for ids, mask in iter_pieces(path, tokenizer, chat_format, piece_chars, text_field):
                val.append(ids, [1] * len(ids) if has_mask and mask is None else mask)
        train.close()
        if val is not None:
            val.close()
    except BaseException:
        train.abort()
        if val is not None:
            val.abort()
        raise
    info = {"fingerprint": fp, "sources": [str(p) for p in paths], "has_mask": has_mask,
            "n_train_tokens": train.count, "n_val_tokens": val.count if val is not None else 0,
            "val": val is not None and val.count > 0}
    write_json_atomic(marker, info)  # last: its presence says every split file is complete
    return _prepared_from(out, info)


def _prepared_from(out: Path, info: dict) -> PreparedData:
    return PreparedData(out / "train", out / "val" if info["val"] else None, info["n_train_tokens"],
                        info["n_val_tokens"], info["has_mask"])


def _has_messages(path: Path) -> bool:
    for _, record in json_lines(path):
        return isinstance(record, dict) and "messages" in record
    return False


def json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for each non-blank line of a JSONL file.

    Raises:
        ConfigError: naming the file and line: not UTF-8 (binary data), not valid JSON, or nested
            too deep for the parser (RecursionError), or a number too long to convert.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start}); is it a binary file?") \
                    from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise ConfigError(f"{where}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
            yield where, record


def _expand(sources: Sequence[str | Path]) -> list[Path]:
    if isinstance(sources, (str, Path)):
        sources = [sources]
    paths: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in (".txt", ".md", ".jsonl", ".ndjson"))
        elif p.is_file():
            paths.append(p)
        else:
            raise ConfigError(f"training data {p} does not exist")
    if not paths:
        raise ConfigError(f"no training files found in {list(map(str, sources))} (.txt, .md or .jsonl)")
    return paths
