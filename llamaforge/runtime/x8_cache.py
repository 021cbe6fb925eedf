"""The x8 cache: a GGUF file's quantized weights already repacked for the C++ kernels, in a file mapped at load.

The kernels read Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K weights in the "x8" layout (8 interleaved rows, qx8.h), so a
quantized GGUF model is repacked at load: ~0.3 s of one core for a 1B Q4_K_M (1.1 s before the word-wide repack), and
even a repack that cost nothing beyond a copy would pay ~0.3 s to fault in and fill fresh memory. The first
load therefore repacks straight into the pages of a new cache file (mapped shared and writable, its disk space
reserved first) and then maps it as every later load does: read-only-in-effect (private, copy-on-write), the
layers viewing it, as llama.cpp maps its GGUF: no weight is copied, the pages are the kernel's page cache
(shared by every process that loads the model), and peak memory is one copy, at the first load too.

    $LLAMAFORGE_X8_CACHE   a folder for the cache files (default $XDG_CACHE_HOME/llamaforge/x8),
                           or "off" to repack at every load (nothing written)

One cache file per model path and kernel build (a changed model overwrites its own cache file; two checkouts
with other kernels sharing the folder each keep theirs); each write deletes the files of models that no longer
exist and all but the `KEEP_PER_MODEL` files used last of each model (`prune`). A cache file is untrusted
input, read as such:
- it is used only when its header names exactly the key expected from the GGUF file being loaded: its
  path, the mapped file's identity (device, inode, size, mtime, ctime: any write or replacement changes ctime), a
  SHA-256 of the GGUF header and of samples of every weight's bytes, and the kernels' build (whose name
  changes with the repack code);
- its table of tensors must equal the one computed here from the GGUF's validated shapes (names, types,
  shapes, offsets, sizes): nothing is sized by what the cache file says, and its size must be exact;
- every tensor's checksum (XXH3-64, the `xxhash` package, ~0.065 s of one core per GiB holding the GIL; or,
  without it, CRC-32, zlib, ~0.33 s per GiB on the torch threads in parallel) is computed as the file is
  written and checked before the file is first used, and again whenever the file's identity (device, inode,
  size, mtime, ctime) differs from the one its stamp (`NAME.x8.ok` beside it) recorded after the last check,
  as git trusts its index's stat data and make a file's mtime: any write to the file, a copy, a rename or a
  replacement changes its ctime and so brings the full check back. `LLAMAFORGE_X8_VERIFY=1` checks every
  tensor at every load (for a disk suspected of flipping bits without a write). Either way one numpy
  reduction first faults the file's pages in (~0.06 s per GiB, without the GIL: `Llama.build` builds the
  tokenizer meanwhile), which the first token would otherwise fault in.
Anything else (missing, truncated, corrupt, stale, another build) is a miss: logged, the weights repacked,
the file rewritten atomically (temporary file + rename; not fsynced, since a torn file is only a miss).
A stamp is untrusted too: one that is missing, unreadable or of another file or header only means a full check.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from llamaforge import kernels
from llamaforge.checkpoints.gguf import GGUFQuantTensor, _address, fault_in
from llamaforge.checkpoints.gguf_reader import GGUFFile
from llamaforge.checkpoints.save import atomic_file

log = logging.getLogger(__name__)

ENV = "LLAMAFORGE_X8_CACHE"
VERIFY_ENV = "LLAMAFORGE_X8_VERIFY"  # "1": check every tensor's checksum at every load, whatever the stamp says
MAGIC = b"LFX8\x00\x00\x00\x01"  # the file format's version is its last byte
_PREFIX = struct.Struct("<8sQ")  # magic, header length
ALIGN = 4096  # tensors start on page boundaries
MIN_BYTES = 16 << 20  # below this much x8 data a repack takes milliseconds: not worth a file
_SAMPLE = 4096  # bytes at each end of every weight that go into the key
_MAX_HEADER = 64 << 20  # a header longer than this is not one of ours
_MAX_STAMP = 4096  # a stamp longer than this is not one of ours


@dataclass
class PackedWeight:
    """A weight already in the x8 layout, for `quantize_model` (which takes it as it is)."""

    raw: torch.Tensor  # uint8 (ceil(rows / 8), bytes per group of 8 rows)
    qtype: str
    shape: tuple[int, int]
    layout: str = "x8"


def cache_dir() -> Optional[Path]:
    """The folder cache files go in, or None when the cache is off (`LLAMAFORGE_X8_CACHE=off`)."""
    value = os.environ.get(ENV, "")
    if value.lower() in ("off", "0", "false", "no"):
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llamaforge" / "x8"


def cache_path(gguf_path: Path, folder: Path, build: Optional[str] = None) -> Path:
    """The cache file of the model at `gguf_path` for the kernels `build` (default: these kernels' build), one per
    resolved path and build, so checkouts with other kernels sharing the folder keep files of their own."""
    if build is None:
        ext = kernels.get_extension()
        build = _build_name(ext) if ext is not None else ""
    resolved = str(Path(gguf_path).resolve())
    digest = hashlib.sha256(f"{resolved}\0{build}".encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return folder / f"{Path(gguf_path).stem[:48]}-{digest}.x8"


def repacked(weights: Mapping[str, Any], *, folder: Optional[Path] = None,
             min_bytes: Optional[int] = None) -> dict[str, Any]:
    """`weights` with every GGUF weight the kernels repack replaced by its `PackedWeight`, from the cache.

    Weights that are not GGUF blocks of one mapped file, or of a type without an x8 layout, are returned
    as they are (quantize_model treats them as before). Without the C++ kernels, with the cache off, or
    for less than `min_bytes` (default MIN_BYTES) of weights, nothing changes either: the layers repack.
    """
    ext = kernels.get_extension()
    folder = cache_dir() if folder is None else folder
    todo = {k: v for k, v in weights.items() if isinstance(v, GGUFQuantTensor) and v.origin is not None
            and v.qtype in kernels.X8_FORMATS and v.raw.device.type == "cpu"}
    origins = {id(v.origin) for v in todo.values()}
    total = sum(_x8_bytes(v) for v in todo.values())
    if ext is None or folder is None or len(origins) != 1 or total < (MIN_BYTES if min_bytes is None else min_bytes):
        return dict(weights)
    origin: GGUFFile = next(iter(todo.values())).origin
    if origin.identity is None:
        return dict(weights)
    build = _build_name(ext)
    path = cache_path(origin.path, folder, build)
    header = _header(origin, todo, build, _checksum()[0])
    for w in todo.values():
        w.release()  # the key's samples were the only GGUF weight pages read: drop them before the cache maps
    packed = _read(path, header, todo)
    if packed is None:
        packed = _build(path, header, todo)
    return {k: packed.get(k, v) for k, v in weights.items()}


def _build_name(ext: Any) -> str:
    """The kernels' build (the extension's name: a hash of their sources, so it changes with the repack code)."""
    return ext.__name__


def _x8_bytes(w: GGUFQuantTensor) -> int:
    groups, per_group = kernels.x8_shape(w.qtype, *w.shape)
    return groups * per_group


def _checksum() -> tuple[str, int, Callable[[Any], int]]:
    """(name, hex digits, function) of the checksum cache files are written and checked with."""
    try:
        import xxhash
    except ImportError:
        return "crc32", 8, zlib.crc32
    return "xxh3_64", 16, xxhash.xxh3_64_intdigest


def _prefetch_samples(todo: Mapping[str, GGUFQuantTensor]) -> None:
    """Ask the kernel for the pages of the key's samples all at once (MADV_WILLNEED: reads in flight together).

    With the GGUF out of the page cache (a first load after a reboot), faulting the samples in one by one
    waited for ~230 reads in turn, each with a 128 KiB readahead: 0.9-2.5 s of wall and 0.14 s of CPU for a
    1B Q4_K_M file here, against 0.05 s and 0.01 s with the reads issued first."""
    if not hasattr(mmap, "MADV_WILLNEED"):
        return
    for w in todo.values():
        if w.mapping is None or w.raw.numel() == 0:
            continue
        start = w.raw.data_ptr() - _address(w.mapping)
        end = start + w.raw.numel()
        for a, b in ((start, min(end, start + _SAMPLE)), (max(start, end - _SAMPLE), end)):
            first = a // mmap.PAGESIZE * mmap.PAGESIZE
            w.mapping.madvise(mmap.MADV_WILLNEED, first, b - first)


def _header(origin: GGUFFile, todo: Mapping[str, GGUFQuantTensor], build: str, checksum: str) -> dict:
    """What the cache file of these weights must say: the key and the tensor table (checksums left blank)."""
    _prefetch_samples(todo)
    fingerprint = hashlib.sha256(origin.buffer[: origin.data_offset])
    for w in todo.values():
        flat = w.raw.reshape(-1)
        fingerprint.update(flat[:_SAMPLE].numpy().tobytes())
        fingerprint.update(flat[-_SAMPLE:].numpy().tobytes())
    ident = origin.identity
    key = {"model": str(Path(origin.path).resolve()), "build": build, "checksum": checksum, "device": ident.device, "inode": ident.inode, "size": ident.size,
           "mtime_ns": ident.mtime_ns, "ctime_ns": ident.ctime_ns, "sha256": fingerprint.hexdigest()}
    table, offset, digits = [], 0, _checksum()[1]
    for name, w in todo.items():
        nbytes = _x8_bytes(w)
        table.append([name, w.qtype, int(w.shape[0]), int(w.shape[1]), offset, nbytes, "0" * digits])
        offset += -(-nbytes // ALIGN) * ALIGN
    header = {"key": key, "tensors": table}
    text_len = len(json.dumps(header).encode())  # checksums have a fixed number of hex digits
    start = -(-(_PREFIX.size + text_len) // ALIGN) * ALIGN
    for row in table:
        row[4] += start
    header["file_size"] = table[-1][4] + table[-1][5]
    return header


def _encode(header: dict) -> bytes:
    text = json.dumps(header).encode()
    return _PREFIX.pack(MAGIC, len(text)) + text


def _read(path: Path, expected: dict, todo: Mapping[str, GGUFQuantTensor],
          announce: bool = True) -> Optional[dict[str, PackedWeight]]:
    """The cached weights if `path` holds exactly what `expected` describes with intact bytes, else None.
    `announce`: log the mapping (not for the file this load has just written: `_build` says so)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(_PREFIX.size)
            want = len(_encode(expected))
            if len(prefix) < _PREFIX.size or _PREFIX.unpack(prefix)[0] != MAGIC:
                return _miss(path, "not an x8 cache file of this version")
            if _PREFIX.unpack(prefix)[1] != want - _PREFIX.size:  # the header's length is known: read no more
                return _miss(path, "it describes other weights or another build")
            try:
                header = json.loads(f.read(want - _PREFIX.size))
            except ValueError:
                return _miss(path, "its header is not valid JSON")
            if not isinstance(header, dict) or header.get("key") != expected["key"]:
                return _miss(path, "it was made from another file, another version of it, or another build")
            if size != expected["file_size"]:
                return _miss(path, f"it has {size} bytes, {expected['file_size']} expected (truncated?)", warn=True)
            sums = _table_sums(header, expected)
            if sums is None:
                return _miss(path, "its tensor table is not the one these weights need", warn=True)
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            identity = _identity(os.fstat(f.fileno()))
    except FileNotFoundError:
        return _miss(path, "none yet")
    except OSError as e:
        return _miss(path, f"cannot read it ({e})", warn=True)
    views = [torch.frombuffer(buf, dtype=torch.uint8, count=row[5], offset=row[4]) for row in expected["tensors"]]
    fault_in(torch.frombuffer(buf, dtype=torch.uint8, count=expected["file_size"] - expected["tensors"][0][4],
                              offset=expected["tensors"][0][4]))  # one call, without the GIL
    seal = _seal(identity, header)
    trusted = _stamp(path) == seal and not _verify_always()
    if not trusted:
        got = _sums(views)
        for row, value, want in zip(expected["tensors"], got, sums):
            if value != want:
                return _miss(path, f"tensor {row[0]!r} fails its {expected['key']['checksum']} check (corrupt)",
                             warn=True)
    if trusted:
        _mark_used(path)
    else:
        _write_stamp(path, seal)  # its sums matched: the file's identity now is the one to trust
    if announce:
        log.info("x8 cache: mapped %s (%.0f MiB, %s)", path, expected["file_size"] / 2**20,
                 "unchanged since its last check" if trusted else "every tensor checked")
    return {row[0]: PackedWeight(v.view(*kernels.x8_shape(row[1], row[2], row[3])), row[1], (row[2], row[3]))
            for row, v in zip(expected["tensors"], views)}


def _table_sums(header: dict, expected: dict) -> Optional[list[int]]:
    """The checksums of a cache file's table when everything else in it equals the expected table, else None."""
    table = header.get("tensors")
    if not isinstance(table, list) or len(table) != len(expected["tensors"]) or header.get("file_size") != \
            expected["file_size"]:
        return None
    sums = []
    for row, want in zip(table, expected["tensors"]):
        if not isinstance(row, list) or row[:6] != want[:6] or len(row) != 7 or not isinstance(row[6], str):
            return None
        try:
            sums.append(int(row[6], 16))
        except ValueError:
            return None
    return sums


def _verify_always() -> bool:
    return os.environ.get(VERIFY_ENV, "").lower() in ("1", "true", "yes", "on")


def stamp_path(path: Path) -> Path:
    """The stamp of the cache file at `path`: the identity it had when its checksums last matched."""
    return path.with_name(path.name + ".ok")


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _seal(identity: list[int], header: dict) -> dict:
    """What the stamp of a cache file with this identity and header says once its checksums matched."""
    return {"identity": identity, "header": hashlib.sha256(_encode(header)).hexdigest()}


def _stamp(path: Path) -> Optional[dict]:
    """The stamp beside the cache file at `path`, or None (none, unreadable, not one of ours)."""
    try:
        with open(stamp_path(path), "rb") as f:
            stamp = json.loads(f.read(_MAX_STAMP + 1)[:_MAX_STAMP])
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _write_stamp(path: Path, seal: dict) -> None:
    """Write the stamp of the cache file at `path` (atomically: a torn stamp is a full check, never a wrong one),
    after its checksums matched. The cache file itself is never touched after it is written (a touch would
    change its ctime, and so its identity)."""
    try:
        with atomic_file(stamp_path(path), overwrite=True, durable=False) as tmp:
            tmp.write_text(json.dumps(seal))
    except OSError:  # a read-only folder: the next load checks the file again
        pass


def _mark_used(path: Path) -> None:
    """Mark the cache file at `path` used now (its stamp's mtime, which `prune` orders by), without rewriting the
    stamp: a rewrite is a new file renamed over the old one, which the filesystem may make wait for its journal
    (0.6 ms of CPU and 4-12 ms of wall here, once 1.8 s of wall on a busy disk), against ~0.02 ms for `utime`."""
    try:
        os.utime(stamp_path(path))
    except OSError:  # a read-only folder: the file only looks older to `prune`
        pass


def _sum(view: torch.Tensor) -> int:
    return _checksum()[2](memoryview(view.numpy()))


def _sums(views: list[torch.Tensor]) -> list[int]:
    """The checksum of each view. XXH3 holds the GIL while it hashes (python-xxhash does not release it), so
    its checks run one after the other (a pool would only hand the GIL around); zlib's CRC-32 releases it, so
    its checks run on the torch threads in parallel."""
    threads = max(1, min(len(views), torch.get_num_threads()))
    if _checksum()[0] != "crc32" or threads == 1:
        return [_sum(v) for v in views]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(_sum, views))


def _miss(path: Path, why: str, warn: bool = False) -> None:
    (log.warning if warn else log.info)("x8 cache %s not used: %s; repacking the weights and writing it again",
                                         path, why)
    return None


def _build(path: Path, header: dict, todo: Mapping[str, GGUFQuantTensor]) -> dict[str, PackedWeight]:
    """Write the cache file, the weights repacked straight into its pages, and map it as a later load does;
    returns the weights (views of the file). Where it cannot be written, the weights repacked in memory."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, overwrite=True, durable=False) as tmp:
            _write(tmp, header, todo)
        _write_stamp(path, _seal(_identity(os.stat(path)), header))  # its sums are those of the bytes just written
        prune(path.parent)
    except (OSError, ValueError) as e:  # a full disk, a read-only folder, a filesystem that cannot map files
        log.warning("x8 cache: cannot write %s (%s); the weights are repacked at every load", path, e)
        packed = None
    else:
        packed = _read(path, header, todo, announce=False)  # None only if another process replaced it meanwhile
        if packed is not None:
            log.info("x8 cache: wrote %s (%.0f MiB)", path, header["file_size"] / 2**20)
    return packed if packed is not None else {name: _repack(w) for name, w in todo.items()}


def _write(tmp: Path, header: dict, todo: Mapping[str, GGUFQuantTensor]) -> None:
    """The cache file's bytes into `tmp`: its disk space reserved first, then every weight repacked into a shared
    mapping of it (the x8 bytes land in the file's page-cache pages: no copy of the weights and no second lot of
    fresh memory, which on the VMs here cost 0.25-1.8 s per 600 MB), its checksum taken, and the header last."""
    size = header["file_size"]
    with open(tmp, "r+b") as f:
        _reserve(f, size)
        buf = mmap.mmap(f.fileno(), size)  # shared and writable
        try:
            for row in header["tensors"]:
                w = todo[row[0]]
                view = torch.frombuffer(buf, dtype=torch.uint8, count=row[5], offset=row[4])
                kernels.repack_into(w.raw, w.qtype, int(w.shape[0]), int(w.shape[1]), view)
                w.release()  # its bytes are in the file now: drop the GGUF's pages from this process
                row[6] = f"{_sum(view):0{len(row[6])}x}"
                del view
            encoded = _encode(header)
            buf[: len(encoded)] = encoded
        finally:
            try:
                buf.close()
            except BufferError:  # an exception's traceback still holds a view: the mapping goes with it
                pass


def _reserve(f: Any, size: int) -> None:
    """Give the open file `f` `size` bytes of disk before its pages are written through a mapping: a full disk is
    then an OSError here, where a page written through the mapping would kill the process (SIGBUS)."""
    try:
        os.posix_fallocate(f.fileno(), 0, size)
        return
    except AttributeError:  # no posix_fallocate (macOS)
        pass
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # what a filesystem without fallocate answers
            raise
    chunk = bytes(min(size, 64 << 20))
    f.seek(0)
    for start in range(0, size, len(chunk)):
        f.write(chunk[: size - start])
    f.flush()


KEEP_PER_MODEL = 2  # cache files (of as many kernel builds) kept per model: the one in use and the last other


def prune(folder: Path, keep: int = KEEP_PER_MODEL) -> list[Path]:
    """Delete the cache files no model needs any more (and temporary files a killed writer left); returns them.

    Called after each write. A file goes when its model no longer exists, or when `keep` files of the same
    model (other kernel builds: another checkout, an older version) were used more recently; a load marks
    its file used (its stamp's mtime; the file's own for a file without a stamp). So the folder holds at
    most `keep` files per model on disk, about `keep` times the models' size, and two checkouts that share
    it and alternate keep theirs. A file's stamp goes with it, and stamps of no file. Only each file's
    header (at most `_MAX_HEADER` bytes) is read to learn which model it belongs to.
    """
    gone, by_model = [], {}
    for file in folder.glob("*.x8"):
        model = _model_of(file)
        if model is not None and not os.path.exists(model):
            gone.append(file)
        elif model is not None:
            by_model.setdefault(model, []).append(file)
    for files in by_model.values():
        gone += sorted(files, key=_unused_s)[keep:]
    gone += [stamp for stamp in map(stamp_path, gone) if stamp.exists()]
    gone += [stamp for stamp in folder.glob("*.x8.ok") if not stamp.with_suffix("").exists()]
    gone += [tmp for tmp in folder.glob(".*.x8.*.tmp") if _age_s(tmp) > 3600]
    for file in gone:
        try:
            file.unlink()
        except OSError:
            pass
    return gone


def _model_of(file: Path) -> Optional[str]:
    """The model path a cache file's header names, or None if it cannot be read as one."""
    try:
        with open(file, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size or _PREFIX.unpack(prefix)[0] != MAGIC:
                return None
            length = _PREFIX.unpack(prefix)[1]
            if length > _MAX_HEADER:
                return None
            model = json.loads(f.read(length)).get("key", {}).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def _age_s(file: Path) -> float:
    try:
        return time.time() - file.stat().st_mtime
    except OSError:
        return 0.0


def _unused_s(file: Path) -> float:
    """Seconds since the cache file was last used: its stamp's age (touched at each use), else its own."""
    stamp = stamp_path(file)
    return _age_s(stamp) if stamp.exists() else _age_s(file)


def _repack(w: GGUFQuantTensor) -> PackedWeight:
    raw, layout = kernels.repack(w.raw, w.qtype, *w.shape)
    if layout != "x8":  # repacked() only takes types the kernels have an x8 layout for
        raise RuntimeError(f"the kernels did not repack a {w.qtype} weight")
    w.release()  # the repacked copy is held: drop the file's pages from this process
    return PackedWeight(raw, w.qtype, (int(w.shape[0]), int(w.shape[1])))
