"""Tokenizer files -> a back-end and the facts around it, the kind recognised from the contents.

| contents                                    | kind            | library        |
|---------------------------------------------|-----------------|----------------|
| `GGUF` magic                                | gguf-gpt2/llama | tokenizers     |
| a JSON object with a "model" entry          | hf              | tokenizers     |
| lines of "<base64> <rank>"                  | tiktoken        | tiktoken       |
| a sentencepiece ModelProto (protobuf)       | sentencepiece   | sentencepiece  |

File names are only used to find companions of a `tokenizer.json` (`tokenizer_config.json`,
`chat_template.jinja`, `generation_config.json`, `config.json`) and to pick a file inside a
directory; what a file *is* always comes from its bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaforge.errors import TokenizerError
from llamaforge.tokenizers.backends import Backend, HFBackend, SentencePieceBackend, TiktokenBackend, guarded
from llamaforge.tokenizers.gguf_vocab import EOG_TEXTS, EOT_TEXTS, build_gguf_vocab, read_gguf_metadata

# Meta llama3 `Tokenizer.pat_str`
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_RESERVED_SPECIAL_TOKENS = 256

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} [0-9]+$")
_MAX_TOKENIZER_BYTES = 512 * 2**20  # the largest tokenizer.json files are ~35 MiB


@dataclass
class Loaded:
    """A back-end and what the tokenizer needs to know beside it."""

    backend: Backend
    kind: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int = -1
    eot_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    chat_templates: dict[str, str] = field(default_factory=dict)  # named templates beside the default ("tool_use")
    special_tokens: dict[str, int] = field(default_factory=dict)
    extra_stop_ids: set[int] = field(default_factory=set)


def llama3_special_tokens(num_base_tokens: int) -> dict[str, int]:
    """Meta llama3's 256 special tokens, numbered after the base vocabulary."""
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>",
        "<|reserved_special_token_3|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|reserved_special_token_4|>",
        "<|eot_id|>",
    ]
    names += [f"<|reserved_special_token_{i}|>" for i in range(5, LLAMA3_NUM_RESERVED_SPECIAL_TOKENS - 5)]
    return {name: num_base_tokens + i for i, name in enumerate(names)}


def resolve(path: str | os.PathLike[str]) -> Path:
    """The tokenizer file a path names: the file itself, or the best candidate in a directory."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise TokenizerError(f"tokenizer path {str(p)!r} does not exist")
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                return p / name
        ggufs = sorted(q for q in p.iterdir() if q.is_file() and _magic(q) == b"GGUF")
        if len(ggufs) == 1:
            return ggufs[0]
        if len(ggufs) > 1:
            raise TokenizerError(
                f"directory {str(p)!r} holds several GGUF files ({', '.join(q.name for q in ggufs)}); "
                "pass the one to read"
            )
        raise TokenizerError(
            f"directory {str(p)!r} holds no tokenizer: expected tokenizer.json, tokenizer.model or a GGUF file"
        )
    raise TokenizerError(f"tokenizer path {str(p)!r} is neither a file nor a directory")


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError:
        return b""


def load(path: str | os.PathLike[str]) -> tuple[Loaded, Path]:
    """Load the tokenizer at `path` (a file or a directory), its kind recognised from its contents."""
    file = resolve(path)
    what = (
        "a sentencepiece tokenizer.model, a tiktoken tokenizer.model, "
        "a Hugging Face tokenizer.json or a GGUF file"
    )
    if _magic(file) == b"GGUF":  # a model file can be gigabytes: read only its metadata
        return from_gguf_metadata(read_gguf_metadata(file), str(file)), file
    try:
        size = file.stat().st_size
        if size > _MAX_TOKENIZER_BYTES:
            raise TokenizerError(
                f"{str(file)!r} ({size / 2**20:.0f} MiB) is too large to be a tokenizer file and is not GGUF; "
                f"expected {what}"
            )
        data = file.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {str(file)!r}: {e}") from e
    if not data:
        raise TokenizerError(f"tokenizer file {str(file)!r} is empty; expected {what}")
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if head[:1] == b"{":
        return load_hf_json(data, file), file
    if _TIKTOKEN_LINE.match(head.split(b"\n", 1)[0].rstrip(b"\r")):
        return load_tiktoken(data, str(file)), file
    if data[:1] == b"\x0a":  # protobuf: field 1 (pieces), length-delimited
        return load_sentencepiece(data, str(file)), file
    raise TokenizerError(f"{str(file)!r} is not a tokenizer file this library reads; expected {what}")


def load_sentencepiece(data: bytes, source: str) -> Loaded:
    """A sentencepiece model, as Meta's Llama 1/2 `Tokenizer` loads it."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
        n = sp.vocab_size()
    except Exception as e:
        raise TokenizerError(
            f"{source!r} looks like a sentencepiece model but cannot be parsed ({e}); "
            "the file is truncated or corrupt"
        ) from e
    if n <= 0:
        raise TokenizerError(f"{source!r}: the sentencepiece model has an empty vocabulary")
    backend = SentencePieceBackend(sp)

    def valid(i: int) -> int | None:
        return i if 0 <= i < n else None

    return Loaded(
        backend=backend,
        kind="sentencepiece",
        bos_id=valid(sp.bos_id()),
        eos_id=valid(sp.eos_id()),
        pad_id=sp.pad_id(),
        add_bos=True,
        special_tokens=dict(backend.special_tokens),
    )


def load_tiktoken(data: bytes, source: str) -> Loaded:
    """A tiktoken BPE file, with the pattern and special tokens of Meta's llama3 `Tokenizer`."""
    import tiktoken

    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected '<base64 token> <rank>'")
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(
                f"{source!r} looks like a tiktoken BPE file but line {n} is malformed ({e}): {line[:80]!r}"
            ) from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(
            f"{source!r}: the tiktoken ranks are not 0..{len(ranks) - 1} without gaps or repeats; "
            "the file is truncated or corrupt"
        )
    special = llama3_special_tokens(len(ranks))
    try:
        enc = tiktoken.Encoding(
            name=Path(source).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special
        )
    except Exception as e:
        raise TokenizerError(f"{source!r}: tiktoken rejected the vocabulary ({e})") from e
    eot = special["<|eot_id|>"]
    return Loaded(
        backend=TiktokenBackend(enc, special),
        kind="tiktoken",
        bos_id=special["<|begin_of_text|>"],
        eos_id=special["<|end_of_text|>"],
        eot_id=eot,
        add_bos=True,
        special_tokens=special,
        extra_stop_ids={eot},
    )


def from_gguf_metadata(fields: dict[str, Any], source: str = "GGUF metadata") -> Loaded:
    """The tokenizer described by GGUF metadata (as returned by `read_gguf_metadata`)."""
    v = build_gguf_vocab(fields, source)
    backend = HFBackend(v.tokenizer, v.piece_bytes)
    return Loaded(
        backend=backend,
        kind=v.kind,
        bos_id=v.bos_id,
        eos_id=v.eos_id,
        pad_id=v.pad_id,
        eot_id=v.eot_id,
        add_bos=v.add_bos,
        chat_template=v.chat_template,
        chat_templates=v.chat_templates,
        special_tokens={**v.special_tokens, **backend.special_tokens},  # the thinking tags too (HFBackend)
        extra_stop_ids=v.stop_ids,
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise TokenizerError(f"cannot read {str(path)!r}: {e}") from e
    return value if isinstance(value, dict) else None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any, n_words: int) -> list[int]:
    """Token ids from a config value (an id or a list of ids); anything else, or outside the vocabulary, is dropped."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n_words]


def _chat_templates(config: dict[str, Any] | None, folder: Path) -> tuple[str | None, dict[str, str]]:
    """The default chat template and the named others ("tool_use", ...), where transformers finds them: the files
    `chat_template.jinja` and `additional_chat_templates/NAME.jinja` (which replace the config's entry), else
    tokenizer_config.json's `chat_template` (a string, or a list of {"name", "template"}), else
    chat_template.json's. A list without "default" gives its first template as the default."""
    extra = folder / "additional_chat_templates"
    named: dict[str, Any] = {}
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        named["default"] = jinja.read_text(encoding="utf-8")
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            named[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if not named:
        template = (config or {}).get("chat_template")
        if template is None:
            template = (_read_json(folder / "chat_template.json") or {}).get("chat_template")
        if isinstance(template, list):
            named = {str(t.get("name")): t.get("template") for t in template if isinstance(t, dict)}
        else:
            named = {"default": template}
    named = {k: v for k, v in named.items() if isinstance(v, str) and v}
    default = named.pop("default", None)
    if default is None and named:
        default = named.pop(next(iter(named)))
    return default, named


def load_hf_json(data: bytes, file: Path) -> Loaded:
    """A Hugging Face `tokenizer.json`, with its sibling config files when present."""
    from tokenizers import Tokenizer as HFTokenizer

    source = str(file)
    try:
        text = data.decode("utf-8-sig")
        spec = json.loads(text)
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a 5000-digit number, nesting too deep
        raise TokenizerError(f"{source!r} starts like JSON but does not parse ({type(e).__name__}: {str(e)[:200]}); "
                             "truncated or corrupt") from e
    if not isinstance(spec, dict) or "model" not in spec:
        raise TokenizerError(
            f"{source!r} is JSON but not a Hugging Face tokenizer.json (no 'model' entry); "
            "pass the tokenizer.json, tokenizer.model or GGUF file"
        )
    try:
        hf = HFTokenizer.from_str(text)
    except Exception as e:
        raise TokenizerError(f"{source!r}: the tokenizers library rejected it ({e})") from e
    backend = HFBackend(hf)
    folder = file.parent
    config = _read_json(folder / "tokenizer_config.json")
    model_config = _read_json(folder / "config.json") or {}
    gen_config = _read_json(folder / "generation_config.json") or {}

    def lookup(name: str) -> int | None:
        text = _token_text((config or {}).get(name))
        return hf.token_to_id(text) if text is not None else None

    # what the post-processor adds around a sequence tells whether (and which) BOS is added
    probe_plain = guarded(lambda: hf.encode("a", add_special_tokens=False).ids, what=source)
    probe_added = guarded(lambda: hf.encode("a", add_special_tokens=True).ids, what=source)
    added_bos = probe_added[0] if len(probe_added) > len(probe_plain) and probe_added[1:2] == probe_plain[:1] else None

    n_words = backend.n_words
    bos = lookup("bos_token")
    if bos is None:
        bos = next(iter(_ids(model_config.get("bos_token_id"), n_words)), added_bos)
    config_eos = _ids(gen_config.get("eos_token_id"), n_words) + _ids(model_config.get("eos_token_id"), n_words)
    eos = lookup("eos_token")
    if eos is None and config_eos:
        eos = config_eos[0]
    pad = lookup("pad_token")
    add_bos = (config or {}).get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = added_bos is not None
    special = dict(backend.special_tokens)
    eot = next((special[t] for t in EOT_TEXTS if t in special), None)
    stops = {special[t] for t in EOG_TEXTS if t in special} | set(config_eos)
    default_template, named_templates = _chat_templates(config, folder)
    return Loaded(
        backend=backend,
        kind="hf",
        bos_id=bos,
        eos_id=eos,
        pad_id=-1 if pad is None else pad,
        eot_id=eot,
        add_bos=add_bos,
        chat_template=default_template,
        chat_templates=named_templates,
        special_tokens=special,
        extra_stop_ids=stops,
    )
