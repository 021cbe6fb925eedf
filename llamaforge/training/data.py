"""Token files on disk, packed into fixed-length training windows, read through numpy memmaps.

A prepared split is two files: `NAME.bin` (token ids, uint16 or uint32) and, for data with a loss
mask (chat examples: loss only on assistant tokens), `NAME.mask` (uint8, 1 = this token is a target).
A `NAME.json` beside them records the dtype and count. The files are written once, in chunks, and read
with `numpy.memmap`, so a corpus larger than RAM trains: only the windows of the current batch are
ever read into memory.

Packing: the token stream (documents one after another, each with its BOS/EOS) is cut into
non-overlapping windows of `seq_len + 1` tokens starting every `seq_len` tokens; window i gives inputs
`ids[i*T : i*T+T]` and targets `ids[i*T+1 : i*T+T+1]` (targets whose mask is 0 become -100, which
cross-entropy ignores).

Order: example k of the whole run (over epochs) is window `perm_e[k % n]` of epoch `e = k // n`, where
`perm_e` is a permutation seeded by (seed, e). Optimizer step s covers examples [s*G, (s+1)*G) with
G = batch_size * grad_accum * world_size; process r, micro-step m reads the micro-batch
`r * grad_accum + m`. So the batches depend only on the step number (resume is exact), and N processes
with accumulation a see the same examples as one process with accumulation N*a.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from llamaforge.errors import ConfigError

IGNORE_INDEX = -100


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class TokenWriter:
    """Append token ids (and optionally a loss mask) to `NAME.bin` / `NAME.mask` in chunks.

    Files are written under temporary names and renamed into place by `close()`, so a split is
    either complete or absent.
    """

    def __init__(self, path_stem: Path, vocab_size: int, with_mask: bool, chunk_tokens: int = 1 << 20):
        self.stem = Path(path_stem)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.with_mask = with_mask
        self.count = 0
        self.n_targets = 0
        self._chunk = chunk_tokens
        self._ids: list[int] = []
        self._mask: list[int] = []
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self._fid = open(self._tmp(".bin"), "wb")
        self._fmask = open(self._tmp(".mask"), "wb") if with_mask else None

    def _tmp(self, suffix: str) -> Path:
        return self.stem.with_name(f".{self.stem.name}{suffix}.tmp")

    def append(self, ids: Sequence[int], mask: Optional[Sequence[int]] = None) -> None:
        """Add one document's ids; `mask` (same length, 0/1) is required iff the writer has a mask."""
        if self.with_mask:
            if mask is None or len(mask) != len(ids):
                raise ConfigError("a masked token file needs a 0/1 mask of the same length as the ids")
            self._mask.extend(mask)
        self._ids.extend(ids)
        if len(self._ids) >= self._chunk:
            self._flush()

    def _flush(self) -> None:
        if not self._ids:
            return
        arr = np.asarray(self._ids, dtype=np.int64)
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise ConfigError(f"token id out of range [0, {self.vocab_size}) while writing {self.stem}")
        self._fid.write(arr.astype(self.dtype).tobytes())
        if self._fmask is not None:
            m = np.asarray(self._mask, dtype=np.uint8)
            self.n_targets += int(m.sum())
            self._fmask.write(m.tobytes())
        else:
            self.n_targets += len(arr)
        self.count += len(arr)
        self._ids, self._mask = [], []

    def close(self) -> None:
        """Flush, fsync and rename the files into place; write the NAME.json description."""
        self._flush()
        for f, suffix in ((self._fid, ".bin"), (self._fmask, ".mask")):
            if f is None:
                continue
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self._tmp(suffix), self.stem.with_suffix(suffix))
        meta = {"dtype": self.dtype.name, "n_tokens": self.count, "n_targets": self.n_targets,
                "vocab_size": self.vocab_size, "has_mask": self.with_mask}
        write_json_atomic(self.stem.with_suffix(".json"), meta)

    def abort(self) -> None:
        """Close and delete the temporary files."""
        for f, suffix in ((self._fid, ".bin"), (self._fmask, ".mask")):
            if f is not None:
                f.close()
                self._tmp(suffix).unlink(missing_ok=True)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never a torn one (checkpoints' atomic_file:
    temporary file, fsync, rename, fsync of the folder)."""
    from llamaforge.checkpoints.save import atomic_file

    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def read_json_or_none(path: Path) -> Optional[dict]:
    """A JSON object written by `write_json_atomic`, or None if it is missing or unreadable (torn by an older writer)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


@dataclass
class TokenFile:
    """A prepared split opened as memmaps: `ids` (N,) and `mask` (N,) or None."""

    ids: np.ndarray
    mask: Optional[np.ndarray]
    n_targets: int

    @staticmethod
    def open(path_stem: Path) -> "TokenFile":
        stem = Path(path_stem)
        info_path = stem.with_suffix(".json")
        if not info_path.is_file():
            raise ConfigError(f"no prepared token file at {stem}.bin/.json; prepare the data first")
        info = read_json_or_none(info_path)
        if info is None or not {"n_tokens", "dtype"} <= set(info):
            raise ConfigError(f"{info_path} is unreadable (torn?); delete {stem.parent} to prepare the data again")
        n = int(info["n_tokens"])
        ids = np.memmap(stem.with_suffix(".bin"), dtype=np.dtype(info["dtype"]), mode="r", shape=(n,)) if n else \
            np.zeros(0, dtype=np.dtype(info["dtype"]))
        mask = None
        if info.get("has_mask"):
            mask = np.memmap(stem.with_suffix(".mask"), dtype=np.uint8, mode="r", shape=(n,)) if n else \
                np.zeros(0, dtype=np.uint8)
        return TokenFile(ids, mask, int(info.get("n_targets", n)))


class PackedDataset:
    """Fixed-length windows over a TokenFile: window i -> (inputs (T,), targets (T,)) as int64."""

    def __init__(self, tokens: TokenFile, seq_len: int, name: str = "data"):
        self.tokens = tokens
        self.seq_len = seq_len
        self.n = max(0, (len(tokens.ids) - 1) // seq_len)
        if self.n == 0:
            raise ConfigError(
                f"the {name} split has {len(tokens.ids)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                f"give more text, a smaller seq_len, or (for validation) a larger val_fraction"
            )

    def __len__(self) -> int:
        return self.n

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start = i * self.seq_len
        chunk = np.asarray(self.tokens.ids[start:start + self.seq_len + 1], dtype=np.int64)
        x, y = chunk[:-1], chunk[1:].copy()
        if self.tokens.mask is not None:
            keep = np.asarray(self.tokens.mask[start + 1:start + self.seq_len + 1], dtype=bool)
            y[~keep] = IGNORE_INDEX
        return x, y

    def n_targets(self, indices: Sequence[int]) -> int:
        """How many targets (not ignored) the windows `indices` hold."""
        if self.tokens.mask is None:
            return len(indices) * self.seq_len
        return int(sum(int(self.tokens.mask[i * self.seq_len + 1:(i + 1) * self.seq_len + 1].sum())
                       for i in indices))

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, T) for the windows `indices`."""
        xs, ys = zip(*(self.window(int(i)) for i in indices))
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


class BatchOrder:
    """Which windows every (step, process, micro-step) reads; see the module docstring."""

    def __init__(self, n: int, batch_size: int, grad_accum: int, world_size: int = 1, seed: int = 0):
        self.n, self.batch_size, self.grad_accum, self.world_size, self.seed = n, batch_size, grad_accum, world_size, seed
        self._perms: dict[int, np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def _example(self, k: int) -> int:
        epoch = k // self.n
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perms = {epoch: perm}  # keep one epoch's permutation at a time
        return int(perm[k % self.n])

    def micro_batch(self, step: int, rank: int, micro: int) -> list[int]:
        """Window indices of micro-step `micro` of process `rank` at optimizer step `step`."""
        first = step * self.global_batch + (rank * self.grad_accum + micro) * self.batch_size
        return [self._example(k) for k in range(first, first + self.batch_size)]

    def step_windows(self, step: int) -> list[int]:
        """All window indices of optimizer step `step` (every process, every micro-step)."""
        first = step * self.global_batch
        return [self._example(k) for k in range(first, first + self.global_batch)]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n
