"""The machine's memory read bandwidth, measured as a streaming kernel reads (the "% of bw" of compare.py / matrix).

Run:  python benchmarks/bandwidth.py [--threads 1,2] [--mib 1024] [--reps 8]

A torch read (`a.sum()`) or copy runs below what the decode kernels stream (26.7 GB/s at 2 threads on the
benchmark VM, where the kernels read up to 44 GB/s), so a share of it reads above 100%. This builds
benchmarks/bwprobe.c (a C streaming read: AVX-512 or AVX2 loads, eight accumulators, one contiguous share per
thread, POSIX threads) with the system C compiler into ~/.cache/llamaforge/bwprobe-<hash>.so, once, loads it
with ctypes and reads a buffer of at least 3x the L3 cache (default 1 GiB) in passes; the figure is the best
pass, of 2 MiB pages (MADV_HUGEPAGE) and of 4 KiB pages, each with and without a software prefetch
(`probe()` returns them all; `read_gbs()` the best). Not used by the library; no test times it.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().with_name("bwprobe.c")
PREFETCH_BYTES = 2048  # software prefetch distance of the "prefetch" variants (1-4 KiB read alike here)


def _l3_bytes() -> int:
    """The largest cache's size in bytes (sysfs), 32 MiB if it cannot be read."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (idx / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KM")) * scale)
    return best or 32 << 20


def _library() -> ctypes.CDLL:
    """The built probe (built on first use, keyed by the source's hash; written atomically)."""
    src = SOURCE.read_bytes()
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamaforge"
    lib = folder / f"bwprobe-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if not lib.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        cc = os.environ.get("CC", "cc")
        try:
            subprocess.run([cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", tmp, str(SOURCE)], check=True,
                           capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            os.unlink(tmp)
            raise RuntimeError(f"bandwidth probe: cannot build {SOURCE} with {cc!r} (set CC to a C compiler): "
                               f"{getattr(e, 'stderr', '') or e}") from e
        os.replace(tmp, lib)
    dll = ctypes.CDLL(str(lib))
    dll.lf_read_gbs.restype = ctypes.c_double
    dll.lf_read_gbs.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_int,
                                ctypes.POINTER(ctypes.c_uint64)]
    dll.lf_load_bits.restype = ctypes.c_int
    return dll


def probe(threads: int, mib: int = 1024, reps: int = 8) -> dict:
    """Read GB/s at `threads` threads for each variant (huge / 4 KiB pages, prefetch or not), the best of `reps`
    passes each, and `read_gbs`, the best of them. The buffer is at least 3x the L3."""
    dll = _library()
    size = max(mib << 20, 3 * _l3_bytes())
    out: dict = {"threads": threads, "buffer_mib": size >> 20, "load_bits": dll.lf_load_bits(), "reps": reps}
    sink = ctypes.c_uint64()
    for pages, huge in (("huge", 1), ("4k", 0)):
        for name, pf in (("", 0), ("_prefetch", PREFETCH_BYTES)):
            gbs = dll.lf_read_gbs(size, threads, reps, pf, huge, ctypes.byref(sink))
            if gbs < 0:
                raise RuntimeError(f"bandwidth probe: no reading at {threads} threads, {size >> 20} MiB "
                                   "(no AVX2, or no memory or thread for it)")
            out[f"{pages}{name}_gbs"] = gbs
    out["read_gbs"] = max(v for k, v in out.items() if k.endswith("_gbs"))
    return out


def describe(bw: dict) -> str:
    """How a compare.py `bandwidth()` record was measured, for the reports' headers (old records: torch's)."""
    if bw.get("source") == "probe":
        p = bw["probe"]
        return (f"C streaming read probe (benchmarks/bandwidth.py: {p['load_bits']}-bit loads over {p['buffer_mib']} "
                f"MiB, best of {p['reps']} passes, of 2 MiB / 4 KiB pages with and without prefetch; torch's "
                f"copy {bw['copy_gbs']:.1f}, read {bw['read_gbs']:.1f} GB/s)")
    return "best of torch's copy / read over 512 MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default 1,2)")
    ap.add_argument("--mib", type=int, default=1024, help="buffer MiB (at least 3x the L3 is used; default 1024)")
    ap.add_argument("--reps", type=int, default=8, help="passes per variant; the best counts (default 8)")
    a = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    for t in (int(x) for x in a.threads.split(",")):
        r = probe(t, a.mib, a.reps)
        print(f"{t} thread{'s' * (t > 1)}, {r['buffer_mib']} MiB, {r['load_bits']}-bit loads: best {r['read_gbs']:.1f} GB/s"
              f" (2 MiB pages {r['huge_gbs']:.1f}, +prefetch {r['huge_prefetch_gbs']:.1f}; 4 KiB pages "
              f"{r['4k_gbs']:.1f}, +prefetch {r['4k_prefetch_gbs']:.1f})")


if __name__ == "__main__":
    main()
