"""The one GGUF reader: header, metadata and tensor table, validated once, without torch.

Every GGUF file llamaforge opens (a checkpoint in `checkpoints/gguf.py`, a vocabulary in
`tokenizers/gguf_vocab.py`) is read here. The file is memory-mapped and parsed with a bound check on
every read, and what it declares is checked before anything is sized by it, as llama.cpp's
`gguf.cpp` does:

- counts (metadata keys, tensors, array elements, string lengths) must fit in the bytes left in the file;
- nested arrays, unknown value types, duplicate keys and duplicate tensor names are refused;
- the keys llamaforge reads must have the GGUF type they are documented with (`KEY_TYPES`): a string
  where a number belongs is refused here, not met as a TypeError later;
- tensors need a known ggml type, at most 8 dimensions, rows that are whole blocks, an aligned offset
  and data inside the file.

Any violation is a CheckpointError that names the file, the key or tensor, and what was found. Tensor
data stays in the mapping (copy-on-write, so tensors made from it are writable without touching the
file). This is ~100x faster than `gguf.GGUFReader` on a real vocabulary (which walks 100k tokenizer
strings element by element with numpy views); the tests check that both read the same fields and tensors.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from llamaforge.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8  # GGML_MAX_DIMS is 4; llama.cpp's reader refuses more, we allow a little slack

_NUMERIC = {  # GGUF value type id -> little-endian numpy dtype
    0: np.dtype("<u1"), 1: np.dtype("<i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"), 4: np.dtype("<u4"),
    5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.dtype("?"), 10: np.dtype("<u8"), 11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}
_STRING, _ARRAY, _FLOAT32, _BOOL = 8, 9, 6, 7
_U64 = struct.Struct("<Q")
_FLOATS = (6, 12)

# What each key llamaforge reads must hold: "int", "float" (an int is accepted), "bool", "str", or a list
# of one of them ("list[int]"); "int|list[int]" for per-layer values. Keys are matched whole or, for
# `ARCH.` keys, by the part after the architecture name. A new key llamaforge reads is one line here.
KEY_TYPES: dict[str, str] = {
    "general.architecture": "str",
    "general.alignment": "int",
    "general.name": "str",
    "general.file_type": "int",
    "split.count": "int",
    "split.no": "int",
    "tokenizer.ggml.model": "str",
    "tokenizer.ggml.pre": "str",
    "tokenizer.ggml.tokens": "list[str]",
    "tokenizer.ggml.token_type": "list[int]",
    "tokenizer.ggml.scores": "list[float]",
    "tokenizer.ggml.merges": "list[str]",
    "tokenizer.ggml.bos_token_id": "int",
    "tokenizer.ggml.eos_token_id": "int",
    "tokenizer.ggml.eot_token_id": "int",
    "tokenizer.ggml.eom_token_id": "int",
    "tokenizer.ggml.unknown_token_id": "int",
    "tokenizer.ggml.padding_token_id": "int",
    "tokenizer.ggml.add_bos_token": "bool",
    "tokenizer.ggml.add_eos_token": "bool",
    "tokenizer.ggml.add_space_prefix": "bool",
    "tokenizer.chat_template": "str",
    "ARCH.context_length": "int",
    "ARCH.embedding_length": "int",
    "ARCH.block_count": "int",
    "ARCH.vocab_size": "int",
    "ARCH.feed_forward_length": "int|list[int]",
    "ARCH.expert_count": "int",
    "ARCH.attention.head_count": "int|list[int]",
    "ARCH.attention.head_count_kv": "int|list[int]",
    "ARCH.attention.key_length": "int",
    "ARCH.attention.value_length": "int",
    "ARCH.attention.layer_norm_rms_epsilon": "float",
    "ARCH.rope.dimension_count": "int",
    "ARCH.rope.freq_base": "float",
    "ARCH.rope.scaling.type": "str",
    "ARCH.rope.scaling.factor": "float",
    "ARCH.rope.scaling.original_context_length": "int",
}
_ARCH_KEYS = {k[len("ARCH."):]: t for k, t in KEY_TYPES.items() if k.startswith("ARCH.")}
_ARCH_NAME = re.compile(r"[a-z0-9_\-]+")


@dataclass
class GGUFTensorInfo:
    """One entry of a GGUF tensor table, with the absolute byte range of its data."""

    name: str
    qtype: str
    shape: tuple[int, ...]  # numpy/torch order: outermost first
    offset: int
    nbytes: int


@dataclass(frozen=True)
class FileIdentity:
    """Which file a mapping holds, from `fstat` of the descriptor that was mapped (not of the path later).

    Any change to the file (a rewrite in place, a replacement under the same name, `touch`) changes at
    least one of these: the kernel sets `ctime_ns` on every write or metadata change, and no call sets it
    back. Caches derived from a file's bytes (runtime/x8_cache.py) are keyed by it.
    """

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


@dataclass
class GGUFFile:
    """A parsed, validated GGUF header over a memory-mapped file.

    `data_offset`: where the (aligned) tensor data starts; the bytes before it are the header.
    `identity`: the mapped file's identity at the time it was opened.
    """

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    buffer: Any = field(repr=False)
    data_offset: int = 0
    identity: Optional[FileIdentity] = None

    def raw(self, info: GGUFTensorInfo) -> Any:
        """The tensor's bytes as a flat torch.uint8 tensor sharing the mapping (no copy)."""
        import torch

        if info.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self.buffer, dtype=torch.uint8, count=info.nbytes, offset=info.offset)


class _Reader:
    """Bounds-checked little-endian reads from a buffer; any overrun is a CheckpointError."""

    def __init__(self, buf: Any, size: int, path: Path) -> None:
        self.buf, self.size, self.path, self.off = buf, size, path, 0

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}; the file is corrupt, download or convert it again")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.off + n > self.size:
            raise CheckpointError(
                f"{self.path}: GGUF file ends at byte {self.size} while reading {what} "
                f"(needs {n} bytes at offset {self.off}); the file is truncated or corrupt, download it again"
            )

    def unpack(self, fmt: str, what: str) -> tuple:
        n = struct.calcsize(fmt)
        self.need(n, what)
        out = struct.unpack_from(fmt, self.buf, self.off)
        self.off += n
        return out

    def string(self, what: str) -> str:
        (n,) = self.unpack("<Q", what)
        self.need(n, what)
        raw = self.buf[self.off: self.off + n]
        self.off += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e})") from e

    def strings(self, n: int, what: str) -> list[str]:
        """`n` strings in a row: `string` in one tight loop (a vocabulary holds ~10^5 of them)."""
        buf, size, off, out = self.buf, self.size, self.off, []
        length, append = _U64.unpack_from, out.append
        try:
            for _ in range(n):
                if off + 8 > size:
                    break
                end = off + 8 + length(buf, off)[0]
                if end > size:
                    break
                append(buf[off + 8: end].decode("utf-8"))
                off = end
        except UnicodeDecodeError as e:
            self.off = off
            raise self.fail(f"{what} item {len(out)} is not valid UTF-8 ({e})") from e
        self.off = off
        if len(out) < n:  # stopped at the end of the file: the error `string` gives there
            self.string(f"{what} item {len(out)}")
        return out

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _NUMERIC:
            dt = _NUMERIC[vtype]
            self.need(dt.itemsize, what)
            v = np.frombuffer(self.buf, dt, 1, self.off)[0]
            self.off += dt.itemsize
            return _f32(v) if vtype == _FLOAT32 else v.item()
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            itype, n = self.unpack("<IQ", what)
            if itype in _NUMERIC:
                dt = _NUMERIC[itype]
                self.need(n * dt.itemsize, what)
                arr = np.frombuffer(self.buf, dt, n, self.off)
                self.off += n * dt.itemsize
                return arr.tolist()
            if itype == _STRING:
                self.need(8 * n, what)  # each string takes at least its 8-byte length: no absurd loop
                return self.strings(n, what)
            if itype == _ARRAY:
                raise self.fail(f"{what} is an array of arrays, which GGUF readers (llama.cpp's too) refuse")
            raise self.fail(f"{what} is an array of unknown GGUF value type {itype}")
        raise self.fail(f"{what} has unknown GGUF value type {vtype}")


def _f32(v: Any) -> float:
    """A float32 metadata value as the shortest Python float that rounds to it (1e-05, not 9.99e-06)."""
    return float(str(np.float32(v)))


def _expected_type(key: str) -> str | None:
    if key in KEY_TYPES:
        return KEY_TYPES[key]
    if key.startswith("tokenizer.chat_template."):  # named templates ("tool_use")
        return "str"
    arch, _, rest = key.partition(".")
    return _ARCH_KEYS.get(rest) if _ARCH_NAME.fullmatch(arch) else None


def _is_kind(vtype: int, kind: str) -> bool:
    if kind == "str":
        return vtype == _STRING
    if kind == "bool":
        return vtype == _BOOL
    if kind == "int":
        return vtype in _NUMERIC and vtype not in _FLOATS and vtype != _BOOL
    if kind == "float":
        return vtype in _NUMERIC and vtype != _BOOL
    raise AssertionError(kind)  # KEY_TYPES is ours, not the file's


def _check_type(r: _Reader, key: str, vtype: int, item_type: int | None, value: Any) -> None:
    """Refuse a known key whose GGUF type is not the documented one (a string where a number belongs...)."""
    expected = _expected_type(key)
    if expected is None:
        return
    for kind in expected.split("|"):
        if kind.startswith("list["):
            if vtype == _ARRAY and item_type is not None and _is_kind(item_type, kind[5:-1]):
                return
        elif _is_kind(vtype, kind):
            return
    got = f"an array of type {item_type}" if vtype == _ARRAY else f"value type {vtype} ({value!r:.40})"
    raise r.fail(f"metadata {key!r} should be {expected.replace('|', ' or ')}, but the file holds {got}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse and validate a GGUF file's header (metadata and tensor table) and map its data.

    Raises:
        CheckpointError: not a GGUF file, an unsupported version or byte order, truncated, or a
            declared count, type, name or size that the file cannot hold or llamaforge cannot trust.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise CheckpointError(f"{path}: {size} bytes is too short for a GGUF file (truncated?)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            st = os.fstat(f.fileno())
            identity = FileIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except OSError as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {e}") from e
    r = _Reader(buf, size, path)
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (first bytes {bytes(buf[:4])!r}, expected b'GGUF')")
    r.off = 4
    (version,) = r.unpack("<I", "the version")
    if version & 0xFFFF == 0:
        raise CheckpointError(f"{path}: big-endian GGUF files are not supported; convert it on a little-endian machine")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (versions 2 and 3 are)")
    n_tensors, n_kv = r.unpack("<QQ", "the header counts")
    # a key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes, a tensor entry 8 + 4 + 4 + 8
    if 13 * n_kv + 24 * n_tensors > size - r.off:
        raise r.fail(f"the header declares {n_kv} metadata keys and {n_tensors} tensors, more than its {size} bytes hold")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}")
        if key in metadata:
            raise r.fail(f"metadata key {key!r} appears twice")
        (vtype,) = r.unpack("<I", f"the type of metadata {key!r}")
        item_type = struct.unpack_from("<I", buf, r.off)[0] if vtype == _ARRAY and r.off + 4 <= size else None
        value = r.value(vtype, f"metadata {key!r}")
        _check_type(r, key, vtype, item_type, value)
        metadata[key] = value
    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = r.string(f"tensor name #{i}")
        if name in names:
            raise r.fail(f"tensor {name!r} appears twice in the tensor table")
        names.add(name)
        (n_dims,) = r.unpack("<I", f"the rank of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise r.fail(f"tensor {name!r} claims {n_dims} dimensions")
        dims = r.unpack(f"<{n_dims}Q", f"the shape of tensor {name!r}")
        type_id, rel_offset = r.unpack("<IQ", f"the type and offset of tensor {name!r}")
        infos.append((name, dims, type_id, rel_offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
        raise r.fail(f"general.alignment={alignment!r} is not a power of two")
    data_start = -(-r.off // alignment) * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, type_id, rel_offset in infos:
        qtype, nbytes = _tensor_size(r, name, dims, type_id)
        if rel_offset % alignment:
            raise r.fail(f"tensor {name!r} starts at offset {rel_offset}, not a multiple of the alignment {alignment}")
        start = data_start + rel_offset
        if start + nbytes > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} needs bytes {start}..{start + nbytes} but the file has only {size} "
                f"bytes; the file is truncated (an interrupted download?), download it again"
            )
        tensors[name] = GGUFTensorInfo(name, qtype, tuple(int(d) for d in reversed(dims)), start, nbytes)
    return GGUFFile(path, version, metadata, tensors, buf, data_start, identity)


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """A GGUF file's validated metadata as plain python values (str, int, float, bool, lists of them).

    Raises:
        CheckpointError: see `read_gguf`.
    """
    return read_gguf(path).metadata


# The ggml types of the files people run: type id -> (name, values per block, bytes per block), as gguf's
# GGML_QUANT_SIZES says (tests/test_gguf_reader.py checks it). Reading a file of these types needs no import of
# the gguf package (~0.05-0.1 s at every load); other ids are looked up there.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 28: ("F64", 1, 8), 30: ("BF16", 1, 2),
}
GGML_BLOCKS: dict[str, tuple[int, int]] = {name: (block, size) for name, block, size in GGML_TYPES.values()}


def ggml_type(r: _Reader, name: str, type_id: int) -> tuple[str, int, int]:
    """(type name, values per block, bytes per block) of a tensor's ggml type id, or a CheckpointError."""
    if type_id in GGML_TYPES:
        return GGML_TYPES[type_id]
    from importlib.metadata import version

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise CheckpointError(
            f"{r.path}: tensor {name!r} has ggml type id {type_id}, unknown to the installed gguf package "
            f"(gguf {version('gguf')}); upgrade gguf or requantize the model"
        ) from None
    if qtype not in GGML_QUANT_SIZES:
        raise r.fail(f"tensor {name!r} has ggml type {qtype.name}, which has no block size")
    return (qtype.name, *GGML_QUANT_SIZES[qtype])


def _tensor_size(r: _Reader, name: str, dims: tuple[int, ...], type_id: int) -> tuple[str, int]:
    qname, block, type_size = ggml_type(r, name, type_id)
    n = math.prod(dims)
    if dims and dims[0] % block:
        raise r.fail(
            f"tensor {name!r} ({qname}) has rows of {dims[0]} values, not a multiple of its block size {block}"
        )
    return qname, n // block * type_size
