"""The one GGUF reader (checkpoints/gguf_reader.py): what a file declares is validated before it is used.

The files here are written byte by byte (`gguf_bytes`), so a test can declare what no writer would:
nested arrays, a string where a number belongs, duplicate names, counts larger than the file. The
fuzz test mutates a valid file at random and requires a CheckpointError or TokenizerError (or a clean
read), never another exception.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaforge.checkpoints.gguf import args_from_gguf
from llamaforge.checkpoints.gguf_reader import KEY_TYPES, read_gguf
from llamaforge.errors import CheckpointError, LlamaforgeError, TokenizerError
from llamaforge.tokenizer import Tokenizer, read_gguf_metadata

U32, I32, F32, BOOL, STR, ARR, U64 = 4, 5, 6, 7, 8, 9, 10


def _str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: int, value: Any) -> bytes:
    if vtype == STR:
        return _str(value)
    if vtype == ARR:
        itype, items = value
        return struct.pack("<IQ", itype, len(items)) + b"".join(_value(itype, v) for v in items)
    return struct.pack({U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q"}.get(vtype, "<I"), value)


def gguf_bytes(kv: list[tuple[str, int, Any]], tensors: list[tuple[str, tuple[int, ...], int, int]] = (),
               data: bytes = b"", n_kv: int | None = None, n_tensors: int | None = None) -> bytes:
    """A GGUF v3 file: metadata (key, type, value), tensors (name, ggml dims, ggml type, offset), data."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                len(kv) if n_kv is None else n_kv)
    for key, vtype, value in kv:
        out += _str(key) + struct.pack("<I", vtype) + _value(vtype, value)
    for name, dims, ttype, offset in tensors:
        out += _str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", ttype, offset)
    out += b"\0" * (-len(out) % 32)
    return out + data


TOKENS = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["▁", "ab", "▁a"]
VOCAB_KV = [
    ("general.architecture", STR, "llama"),
    ("tokenizer.ggml.model", STR, "llama"),
    ("tokenizer.ggml.tokens", ARR, (STR, TOKENS)),
    ("tokenizer.ggml.scores", ARR, (F32, [0.0] * 3 + [-float(i) for i in range(len(TOKENS) - 3)])),
    ("tokenizer.ggml.token_type", ARR, (I32, [2, 3, 3] + [1] * (len(TOKENS) - 3))),
    ("tokenizer.ggml.bos_token_id", U32, 1),
    ("tokenizer.ggml.eos_token_id", U32, 2),
    ("tokenizer.ggml.add_bos_token", BOOL, True),
]
MODEL_KV = [
    ("llama.block_count", U32, 1), ("llama.embedding_length", U32, 8), ("llama.feed_forward_length", U32, 16),
    ("llama.attention.head_count", U32, 2), ("llama.context_length", U32, 64),
]


def write(tmp_path: Path, blob: bytes, name: str = "m.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(blob)
    return path


def test_a_valid_file_reads_and_its_vocabulary_builds(tmp_path: Path) -> None:
    path = write(tmp_path, gguf_bytes(VOCAB_KV + MODEL_KV, [("token_embd.weight", (8, len(TOKENS)), 0, 0)],
                                      data=bytes(4 * 8 * len(TOKENS))))
    gf = read_gguf(path)
    assert gf.metadata["tokenizer.ggml.tokens"] == TOKENS and gf.metadata["tokenizer.ggml.add_bos_token"] is True
    assert gf.tensors["token_embd.weight"].shape == (len(TOKENS), 8)
    assert args_from_gguf(gf).max_seq_len == 64
    assert read_gguf_metadata(path) == gf.metadata
    assert Tokenizer.from_file(path).decode(Tokenizer.from_file(path).encode("ab a")) == "ab a"


@pytest.mark.parametrize("kv, message", [
    ([("llama.context_length", STR, "4096")], "'llama.context_length' should be int"),
    ([("llama.block_count", F32, 2.0)], "'llama.block_count' should be int"),
    ([("tokenizer.ggml.tokens", ARR, (U32, [1, 2]))], "should be list\\[str\\]"),
    ([("tokenizer.ggml.add_bos_token", U32, 1)], "should be bool"),
    ([("general.alignment", STR, "32")], "should be int"),
    ([("tokenizer.chat_template", ARR, (ARR, []))], "array of arrays"),
    ([("x.nested", ARR, (ARR, []))], "array of arrays"),
    ([("k", U32, 1), ("k", U32, 2)], "'k' appears twice"),
    ([("general.alignment", U32, 24)], "not a power of two"),
    ([("k", 99, 0)], "unknown GGUF value type 99"),
])
def test_wrong_metadata_is_a_checkpoint_error(tmp_path: Path, kv: list, message: str) -> None:
    # before the one reader: the checkpoint path kept nested arrays and wrong types (TypeError later),
    # the vocabulary path (gguf.GGUFReader) kept the last of two duplicate keys
    path = write(tmp_path, gguf_bytes(kv))
    with pytest.raises(CheckpointError, match=message):
        read_gguf(path)
    with pytest.raises(TokenizerError, match=message):
        read_gguf_metadata(path)


def test_declared_counts_and_tensors_are_checked_before_use(tmp_path: Path) -> None:
    cases = {
        "huge.gguf": (gguf_bytes([], n_kv=1 << 60), "declares 1152921504606846976 metadata keys"),
        "many.gguf": (gguf_bytes([], n_tensors=1 << 40), "tensors, more than"),
        "longarr.gguf": (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _str("a") + struct.pack("<IIQ", ARR, STR, 1 << 50)
                         + bytes(64), "ends at byte"),
        "dup.gguf": (gguf_bytes([], [("w", (32,), 0, 0), ("w", (32,), 0, 128)], bytes(256)), "'w' appears twice"),
        "align.gguf": (gguf_bytes([], [("w", (32,), 0, 4)], bytes(256)), "not a multiple of the alignment"),
        "rank.gguf": (gguf_bytes([], [("w", (1,) * 9, 0, 0)], bytes(64)), "claims 9 dimensions"),
        "beyond.gguf": (gguf_bytes([], [("w", (1 << 40,), 0, 0)], bytes(64)), "file has only"),
        "qtype.gguf": (gguf_bytes([], [("w", (32,), 999, 0)], bytes(64)), "ggml type id 999"),
        "block.gguf": (gguf_bytes([], [("w", (33,), 8, 0)], bytes(64)), "not a multiple of its block size"),
        "utf8.gguf": (gguf_bytes([("k", STR, b"\xff\xfe")]), "not valid UTF-8"),
    }
    for name, (blob, message) in cases.items():
        with pytest.raises(CheckpointError, match=message):
            read_gguf(write(tmp_path, blob, name))


# -- fuzz: random damage to a valid file is a llamaforge error or a clean read ---------------------------

_VALID = gguf_bytes(VOCAB_KV + MODEL_KV, [("token_embd.weight", (8, len(TOKENS)), 0, 0)],
                    data=bytes(4 * 8 * len(TOKENS)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.integers(0, len(_VALID)))
def test_fuzzed_gguf_is_a_llamaforge_error_or_a_clean_read(tmp_path: Path, edits: list, cut: int) -> None:
    blob = bytearray(_VALID)
    for pos, byte in edits:
        blob[pos] = byte
    path = write(tmp_path, bytes(blob[: max(cut, 24)]), "fuzz.gguf")
    try:
        gf = read_gguf(path)
        args_from_gguf(gf)
    except LlamaforgeError:
        pass
    try:
        Tokenizer.from_file(path)
    except LlamaforgeError:
        pass


# -- property: any type or value under the keys llamaforge reads ----------------------------------------------

_SCALARS = st.one_of(
    st.tuples(st.just(U32), st.integers(0, 2**32 - 1)), st.tuples(st.just(I32), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just(F32), st.floats(width=32)), st.tuples(st.just(BOOL), st.booleans()),
    st.tuples(st.just(U64), st.integers(0, 2**64 - 1)), st.tuples(st.just(STR), st.text(max_size=12)),
)
_VALUES = st.one_of(_SCALARS, _SCALARS.flatmap(
    lambda s: st.tuples(st.just(ARR), st.tuples(st.just(s[0]), st.lists(st.just(s[1]), max_size=40)))))
_KEYS = st.sampled_from(sorted(k.replace("ARCH.", "llama.") for k in KEY_TYPES))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(_KEYS, _VALUES, min_size=1, max_size=4))
def test_any_value_under_a_known_key_is_a_llamaforge_error_or_loads(tmp_path: Path, changes: dict) -> None:
    kv = {k: (t, v) for k, t, v in VOCAB_KV + MODEL_KV}
    kv.update(changes)
    blob = gguf_bytes([(k, t, v) for k, (t, v) in kv.items()], [("token_embd.weight", (8, len(TOKENS)), 0, 0)],
                      data=bytes(4 * 8 * len(TOKENS)))
    path = write(tmp_path, blob, "kv.gguf")
    try:
        args_from_gguf(read_gguf(path))
    except LlamaforgeError:
        pass
    try:
        Tokenizer.from_file(path)
    except LlamaforgeError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_header_of_a_real_checkpoint_is_a_llamaforge_error_or_loads(tiny_checkpoints, tmp_path: Path,
                                                                           data: st.DataObject) -> None:
    from llamaforge import checkpoints

    blob = bytearray(tiny_checkpoints.gguf.read_bytes())
    header_end = min(read_gguf(tiny_checkpoints.gguf).tensors.values(), key=lambda t: t.offset).offset
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, header_end - 1))] = data.draw(st.integers(0, 255))
    path = write(tmp_path, bytes(blob), "tiny.gguf")
    try:
        checkpoints.load(path, keep_quantized=data.draw(st.booleans()))
    except LlamaforgeError:
        pass
    try:
        Tokenizer.from_file(path)
    except LlamaforgeError:
        pass


def test_a_vocabulary_of_huge_tokens_is_refused_not_rebuilt_for_hours(tmp_path: Path) -> None:
    # rebuilding sentencepiece merges tries every split of every token: n^2 for a token of n characters
    kv = [(k, t, v) for k, t, v in VOCAB_KV if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                                         "tokenizer.ggml.token_type")]
    tokens = TOKENS + ["a" * 20000 + str(i) for i in range(2)]
    kv += [("tokenizer.ggml.tokens", ARR, (STR, tokens)), ("tokenizer.ggml.scores", ARR, (F32, [0.0] * len(tokens))),
           ("tokenizer.ggml.token_type", ARR, (I32, [2, 3, 3] + [1] * (len(tokens) - 3)))]
    with pytest.raises(TokenizerError, match="too long to rebuild its merges.*20001 characters"):
        Tokenizer.from_file(write(tmp_path, gguf_bytes(kv), "huge.gguf"))


def test_the_readers_ggml_type_table_is_ggufs() -> None:
    """The types the reader knows without importing gguf have gguf's names, ids and block sizes."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from llamaforge.checkpoints.gguf_reader import GGML_TYPES

    for type_id, (name, block, size) in GGML_TYPES.items():
        assert GGMLQuantizationType(type_id).name == name
        assert GGML_QUANT_SIZES[GGMLQuantizationType(type_id)] == (block, size)
