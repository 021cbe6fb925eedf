"""A tokenizer as GGUF `tokenizer.*` metadata, the keys llama.cpp's convert_hf_to_gguf.py writes.

- sentencepiece (`tokenizer.model`): llama.cpp's "llama" vocabulary: pieces, scores, token types.
- Hugging Face byte-level BPE (`tokenizer.json`: GPT-2 style, Llama 3, Qwen2/2.5/3, SmolLM): the "gpt2"
  vocabulary: tokens, merges, token types (normal 1, control 3 for special added tokens, user-defined 4
  for other added tokens, unused 5 for padding rows), and `tokenizer.ggml.pre`, the name llama.cpp knows
  for the file's pre-tokenizer regexes (found by comparing them with gguf_pretok's table, never by the
  model's name).

Both also carry the special ids, `add_bos_token` and the chat template. The vocabulary is padded to the
model's embedding rows, as llama.cpp requires. The result is checked before it is returned: the GGUF
vocabulary built back from it (as llamaforge reads GGUF files, which follows llama.cpp) must tokenize a
probe text exactly as the source tokenizer does. For byte-level BPE a difference is an error. A
sentencepiece model whose normalizer rewrites whitespace (sentencepiece's default, not Llama 2's)
cannot be expressed in GGUF at all (llama.cpp's own converter writes the same keys): that is a warning.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

from llamaforge.errors import TokenizerError
from llamaforge.tokenizers.gguf_pretok import PRE_TOKENIZERS

logger = logging.getLogger(__name__)

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_GPT2_REGEX = PRE_TOKENIZERS["gpt-2"].regexes[0]
_PROBE = "Hello world! It's 2025: naïve café, 12345 ÜBER 日本語 🤖\n\n  indented\tand <|im_start|> tokens."


def tokenizer_gguf_metadata(tokenizer: Any, vocab_size: Optional[int] = None, *,
                            rebuild: Optional[Any] = None) -> dict[str, Any]:
    """The GGUF `tokenizer.*` keys for a llamaforge `Tokenizer` loaded from a tokenizer.model or tokenizer.json.

    Args:
        tokenizer: a `llamaforge.Tokenizer` whose `source` is its file.
        vocab_size: the model's embedding rows (the vocabulary is padded to it); default the tokenizer's size.
        rebuild: `Tokenizer.from_gguf_metadata` (passed in: this layer sits below the Tokenizer): the metadata is
            rebuilt with it and must tokenize a probe text exactly as `tokenizer` does.

    Raises:
        TokenizerError: a kind or pre-tokenizer GGUF cannot express, a vocabulary larger than the model's, or
            a rebuilt vocabulary that tokenizes differently.
    """
    if not tokenizer.source or not Path(tokenizer.source).is_file():
        raise TokenizerError(f"cannot embed this {tokenizer.kind} tokenizer in GGUF: its source file is unknown")
    if tokenizer.kind == "sentencepiece":
        md = sentencepiece_gguf_metadata(tokenizer.source)
    elif tokenizer.kind == "hf":
        md = _byte_level_bpe(tokenizer, vocab_size or tokenizer.n_words)
    else:
        raise TokenizerError(
            f"a {tokenizer.kind} tokenizer cannot be embedded in GGUF by llamaforge (sentencepiece tokenizer.model "
            "and byte-level BPE tokenizer.json can); load the GGUF with tokenizer_path"
        )
    n = len(md["tokenizer.ggml.tokens"])
    if vocab_size is not None and n < vocab_size:  # padding rows, as convert_hf_to_gguf writes them
        md["tokenizer.ggml.tokens"] += [f"[PAD{i}]" for i in range(n, vocab_size)]
        md["tokenizer.ggml.token_type"] += [UNUSED] * (vocab_size - n)
        if "tokenizer.ggml.scores" in md:
            md["tokenizer.ggml.scores"] += [-1000.0] * (vocab_size - n)
    elif vocab_size is not None and n > vocab_size:
        raise TokenizerError(f"the tokenizer has {n} tokens but the model only {vocab_size} embedding rows")
    if tokenizer.chat_template:
        md["tokenizer.chat_template"] = tokenizer.chat_template
    for name, template in tokenizer.chat_templates.items():  # as gguf-py's add_chat_template writes a list
        md[f"tokenizer.chat_template.{name}"] = template
    if tokenizer.chat_templates:
        md["tokenizer.chat_templates"] = list(tokenizer.chat_templates)
    if rebuild is not None:
        _check_round_trip(md, tokenizer, rebuild, strict=tokenizer.kind == "hf")
    return md


def sentencepiece_gguf_metadata(model_file: Union[str, os.PathLike]) -> dict:
    """The `tokenizer.*` GGUF keys llama.cpp's converter writes for a sentencepiece vocabulary."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    types = []  # llama.cpp's token types: normal 1, unknown 2, control 3, unused 5, byte 6
    for i in range(sp.vocab_size()):
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 1)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(sp.vocab_size())],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(sp.vocab_size())],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }


def _pre_regexes(spec: Any) -> Optional[tuple[str, ...]]:
    """The regexes a tokenizer.json pre_tokenizer splits with, in order, or None if it does something else."""
    if spec is None:
        return ()
    kind = spec.get("type")
    if kind == "Sequence":
        out: tuple[str, ...] = ()
        for part in spec.get("pretokenizers", []):
            sub = _pre_regexes(part)
            if sub is None:
                return None
            out += sub
        return out
    if kind == "Split" and spec.get("behavior") == "Isolated" and not spec.get("invert"):
        pattern = spec.get("pattern", {})
        return (pattern["Regex"],) if "Regex" in pattern else None
    if kind == "Digits":
        return (r"\p{N}",) if spec.get("individual_digits") else (r"\p{N}+",)
    if kind == "ByteLevel":
        return (_GPT2_REGEX,) if spec.get("use_regex", True) and not spec.get("add_prefix_space") else (
            () if not spec.get("use_regex", True) and not spec.get("add_prefix_space") else None)
    return None


def gguf_pre_name(spec: Any) -> str:
    """The `tokenizer.ggml.pre` whose regexes are exactly those of a tokenizer.json `pre_tokenizer`."""
    regexes = _pre_regexes(spec)
    for name, pre in PRE_TOKENIZERS.items():  # the first name of each group is llama.cpp's own
        if regexes and pre.regexes == regexes:
            return name
    raise TokenizerError(
        f"the tokenizer.json pre-tokenizer {json.dumps(spec)[:200]} matches none of the pre-tokenizers llama.cpp "
        f"knows ({len(PRE_TOKENIZERS)} names); it cannot be written to GGUF faithfully"
    )


def _byte_level_bpe(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    spec = json.loads(Path(tokenizer.source).read_text(encoding="utf-8-sig"))
    model = spec.get("model", {})
    decoder = spec.get("decoder") or {}
    byte_level = decoder.get("type") == "ByteLevel" or any(
        d.get("type") == "ByteLevel" for d in decoder.get("decoders", []) if isinstance(d, dict))
    if model.get("type") != "BPE" or not byte_level:
        raise TokenizerError(
            f"{tokenizer.source}: only byte-level BPE tokenizer.json files can be written as a GGUF 'gpt2' "
            f"vocabulary (this one is {model.get('type')!r}, decoder {decoder.get('type')!r})"
        )
    pre = gguf_pre_name(spec.get("pre_tokenizer"))
    vocab: dict[str, int] = dict(model.get("vocab", {}))
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    n = max(max(vocab.values()) + 1, vocab_size) if vocab else vocab_size
    tokens, types = [f"[PAD{i}]" for i in range(n)], [UNUSED] * n
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (CONTROL if added[i].get("special") else USER_DEFINED) if i in added else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bool(tokenizer.add_bos),
    }
    for key, value in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("padding", tokenizer.pad_id)):
        if value is not None and value >= 0:
            md[f"tokenizer.ggml.{key}_token_id"] = int(value)
    return md


def _check_round_trip(md: dict[str, Any], tokenizer: Any, rebuild: Any, strict: bool) -> None:
    back = rebuild(md, source="the GGUF metadata being written")
    for probe in _PROBE.splitlines(keepends=True):
        want = tokenizer.encode(probe, bos=False, eos=False)
        got = back.encode(probe, bos=False, eos=False)
        if want == got:
            continue
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        message = (f"the GGUF vocabulary built from {tokenizer.source} tokenizes {probe!r} as {len(got)} tokens "
                   f"where the source gives {len(want)}, apart from token {at} on: {got[at:at + 8]} against "
                   f"{want[at:at + 8]}")
        if strict:
            raise TokenizerError(message + "; it cannot be embedded faithfully")
        logger.warning("%s: this sentencepiece model normalizes text in a way GGUF cannot express; llama.cpp "
                       "will tokenize such text differently", message)
        return
