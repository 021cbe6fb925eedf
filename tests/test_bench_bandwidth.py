"""benchmarks/bandwidth.py's C read probe: it builds, reads every byte of its buffer (its checksum equals one
computed here in numpy from the same fill), at 1 and 3 threads, and rejects bad arguments. No timing is asserted."""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

if "bandwidth" not in sys.modules:  # by its own name, as the benchmarks import it (benchmarks/ is not on sys.path)
    _spec = importlib.util.spec_from_file_location("bandwidth", BENCH / "bandwidth.py")
    sys.modules["bandwidth"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["bandwidth"])
bandwidth = sys.modules["bandwidth"]

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")

MIB = 1 << 20


def _expected(nbytes: int, threads: int) -> int:
    """The probe's checksum of one pass (bwprobe.c's lf_read_gbs comment), from the fill it writes."""
    buf = np.zeros(nbytes, dtype=np.uint8)
    buf[::64] = (np.arange(nbytes // 64) % 256).astype(np.uint8)
    chunks = nbytes // 512
    per = chunks // threads
    total = 0
    for t in range(threads):
        lo, hi = t * per, chunks if t == threads - 1 else (t + 1) * per
        lines = buf[lo * 512: hi * 512].view(np.uint64).reshape(-1, 8, 8)  # (chunks, accumulator, lane)
        acc = np.bitwise_xor.reduce(np.bitwise_xor.reduce(lines, axis=0), axis=0)  # (lane,)
        total += int(acc.astype(object).sum())
    return total % 2**64


@pytest.mark.parametrize("threads", [1, 3])
def test_probe_reads_every_byte(threads):
    dll = bandwidth._library()
    if dll.lf_load_bits() == 0:
        pytest.skip("no AVX2")
    sink = ctypes.c_uint64()
    nbytes, reps = 6 * MIB, 2
    gbs = dll.lf_read_gbs(nbytes, threads, reps, 0, 1, ctypes.byref(sink))
    assert gbs > 0
    assert sink.value == reps * _expected(nbytes, threads) % 2**64
    gbs = dll.lf_read_gbs(nbytes, threads, 1, 2048, 0, ctypes.byref(sink))  # 4 KiB pages, prefetching
    assert gbs > 0 and sink.value == _expected(nbytes, threads)


def test_probe_rejects_bad_arguments():
    dll = bandwidth._library()
    sink = ctypes.c_uint64()
    for args in [(MIB, 1, 1, 0, 1), (4 * MIB, 0, 1, 0, 1), (4 * MIB, 65, 1, 0, 1), (4 * MIB, 1, 0, 0, 1),
                 (4 * MIB, 1, 1, -1, 1)]:  # under 2 MiB, threads 0 / 65, no pass, a negative prefetch
        assert dll.lf_read_gbs(*args, ctypes.byref(sink)) == -1.0


def test_describe_names_the_probe_or_torch():
    rec = {"copy_gbs": 20.0, "read_gbs": 18.0, "roofline_gbs": 31.0, "source": "probe",
           "probe": {"load_bits": 512, "buffer_mib": 1024, "reps": 8}}
    assert "512-bit loads over 1024 MiB" in bandwidth.describe(rec)
    assert "torch" in bandwidth.describe({"copy_gbs": 20.0, "read_gbs": 18.0, "roofline_gbs": 20.0})
