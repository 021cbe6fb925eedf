"""Batch-1 decode GEMV streaming rate per weight type at Llama shapes, A/B between kernel builds.

Run:  python benchmarks/gemv.py [--shape 1b|3b] [--types Q4_0,Q4_K,...] [--rows 1] [--avx2|--vnni]
                                 [--against PATH.so ...] [--rounds 5] [--resident]

For each type it makes one Llama layer's seven projections (wq wk wv wo w1 w2 w3 at the shape, random
weights: speed does not depend on their values) times enough layers to exceed the 32 MiB L3, so every
sweep streams the weights from DRAM as a decode step does, and times sweeps of `--rows` activation rows
(M = 1: batch-1 decode) through the extension's `qlinear` on ONE thread, by process CPU time (other jobs
on a shared machine disturb it only through the memory bus and caches). GB/s = weight bytes read / CPU
seconds; with `--rows` above 1 (the prefill tiles) GOP/s = 2 * rows * weights / CPU seconds instead. With `--against OLD.so` (a built extension from ~/.cache/llamaforge/kernels, e.g. main's) the
builds are alternated round by round, each round of each build in a fresh process on weights repacked by
its own `repack_x8` (a changed x8 layout is measured as it is), and the table shows the medians (and
ranges) of `--rounds` rounds per build. `--resident` times one (dim, dim) projection instead, small
enough to stay in the L3 cache: the tiles' compute rate alone (with `--rows` 5 and up: what prefill and
speculative verification tiles can do, apart from DRAM). `--avx2` forces the AVX2 tiles
where the CPU has AVX-512 (what AVX2-only CPUs such as Zen 3 run); `--vnni` keeps the AVX-512 ones.
Not run by the tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaforge import kernels  # noqa: E402
from llamaforge.kernels import loader  # noqa: E402

SHAPES = {"1b": (2048, 512, 8192), "3b": (3072, 1024, 8192), "8b": (4096, 1024, 14336)}  # dim, kv dim, ffn
TYPES = ["Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"]
L3_BYTES = 32 << 20


def load_so(path: Path):
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_bytes(qtype: str, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """GGUF bytes (n, bytes_per_row) of `qtype`: random quants with small finite f16 scales."""
    info = kernels.qtype_info(qtype)
    if qtype in ("F16", "BF16"):
        w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32) * 0.02)
        return w.to(torch.float16 if qtype == "F16" else torch.bfloat16).view(torch.uint8).reshape(n, -1)
    nb = k // info.block
    raw = rng.integers(0, 256, (n, nb, info.bytes), dtype=np.uint8)
    offsets = {"Q6_K": [208], "Q4_K": [0, 2], "Q5_K": [0, 2]}.get(qtype, [0])
    for off in offsets:
        raw[:, :, off : off + 2] = rng.uniform(1e-3, 1e-2, (n, nb, 1)).astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(n, nb * info.bytes))


def layer_shapes(shape: str) -> list[tuple[int, int]]:
    dim, kv, ffn = SHAPES[shape]
    return [(dim, dim), (kv, dim), (kv, dim), (dim, dim), (ffn, dim), (dim, ffn), (ffn, dim)]


def make_weights(ext, qtype: str, mats: list[tuple[int, int]], raws: list[torch.Tensor]) -> list[tuple]:
    """(bytes, type id, N, K, layout id) per matrix (shapes `mats`, repeated), in the build's fastest layout."""
    info = kernels.qtype_info(qtype)
    out = []
    for raw, (n, k) in zip(raws, mats * (len(raws) // len(mats))):
        if qtype in ("F16", "BF16"):  # as kernels.repack: a copy in huge pages where the build has it
            raw = ext.copy_streamed(raw) if hasattr(ext, "copy_streamed") else raw
            w = raw.view(torch.float16 if qtype == "F16" else torch.bfloat16).reshape(n, k)
            out.append((w, info.type_id, n, k, 0))
        elif ext.x8_supported(info.type_id):
            out.append((ext.repack_x8(raw, info.type_id, n, k), info.type_id, n, k, 1))
        else:
            out.append((raw, info.type_id, n, k, 0))
    return out


def sweep_cpu_s(ext, weights: list[tuple], xs: dict[int, torch.Tensor]) -> float:
    t0 = time.process_time()
    for w, qt, n, k, layout in weights:
        ext.qlinear(xs[k], w, qt, n, k, None, 0, layout)
    return time.process_time() - t0


def measure(ext, args) -> dict[str, float]:
    """GB/s per type for one build: the best of `--sweeps` sweeps after a warm-up."""
    rng = np.random.default_rng(0)
    out = {}
    with torch.inference_mode():
        for qtype in args.types:
            info = kernels.qtype_info(qtype)
            mats = layer_shapes(args.shape)[:1] if args.resident else layer_shapes(args.shape)
            layer_bytes = sum(info.bytes_per_row(k) * n for n, k in mats)
            n_layers = 1 if args.resident else max(2, -(-3 * L3_BYTES // layer_bytes))
            raws = [random_bytes(qtype, n, k, rng) for _ in range(n_layers) for n, k in mats]
            total = sum(r.numel() for r in raws)
            ws = make_weights(ext, qtype, mats, raws)
            xs = {k: torch.randn(args.rows, k) for k in {k for _, k in mats}}
            sweep_cpu_s(ext, ws, xs)  # warm-up
            out[qtype] = total / min(sweep_cpu_s(ext, ws, xs) for _ in range(args.sweeps)) / 1e9
            del raws, ws
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--types", type=lambda s: s.split(","), default=TYPES)
    parser.add_argument("--rows", type=int, default=1, help="activation rows (1 = batch-1 decode)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--sweeps", type=int, default=3, help="sweeps per type per round (the best is kept)")
    parser.add_argument("--against", type=Path, nargs="*", default=[], help="other built extensions (.so) to compare")
    parser.add_argument("--resident", action="store_true", help="one (dim, dim) projection, held in the L3 cache")
    parser.add_argument("--so", type=Path, help=argparse.SUPPRESS)  # one build, one round (a child process)
    isa = parser.add_mutually_exclusive_group()
    isa.add_argument("--avx2", action="store_true", help="force the AVX2 tiles (as on AVX2-only CPUs)")
    isa.add_argument("--vnni", action="store_true", help="use the AVX-512 VNNI tiles (the default where supported)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.so is not None:  # child: one round of one build, as JSON
        ext = load_so(args.so) if args.so.name != "this" else loader.get_extension()
        ext.use_vnni(not args.avx2)
        if hasattr(ext, "use_avx512_gemm"):  # the 16-bit tiles (--rows above 8: their GEMM) too
            ext.use_avx512_gemm(not args.avx2)
        print("RESULT " + json.dumps({"tiles": "AVX-512 VNNI" if ext.use_vnni() else "AVX2", **measure(ext, args)}))
        return
    if loader.get_extension() is None:
        sys.exit("the C++ kernels are not available here")
    builds = {"this": Path("this"), **{p.parent.name.rsplit("_", 1)[-1]: p for p in args.against}}
    results: dict[str, list[dict]] = {b: [] for b in builds}
    child = [sys.executable, __file__, "--shape", args.shape, "--types", ",".join(args.types), "--rows",
             str(args.rows), "--sweeps", str(args.sweeps)] + (["--avx2"] if args.avx2 else []) + \
            (["--resident"] if args.resident else [])
    for _ in range(args.rounds):  # builds alternate, each in a fresh process (pybind11 registers a type once)
        for b, path in builds.items():
            out = subprocess.run([*child, "--so", str(path)], capture_output=True, text=True, check=True).stdout
            results[b].append(json.loads(out.split("RESULT ", 1)[1]))
    tiles = results["this"][0]["tiles"]
    # M > 1 (prefill tiles): GOP/s = 2 * M * weights / CPU s, the compute rate, instead of the streaming rate
    unit = "GB/s = weight bytes / CPU s" if args.rows == 1 else "GOP/s = 2 * M * weights / CPU s"
    where = " (one (dim, dim) projection, in L3)" if args.resident else ""
    print(f"{args.shape} shape{where}, M = {args.rows}, 1 thread, {tiles} tiles; builds alternated in fresh processes, "
          f"median of {args.rounds} rounds (each the best of {args.sweeps} sweeps); {unit}")
    print(f"{'type':6s} " + " ".join(f"{b + ' ' + unit.split()[0]:>22s}" for b in builds))
    for qtype in args.types:
        info = kernels.qtype_info(qtype)
        per_gb = 1.0 if args.rows == 1 else 2 * args.rows * info.block / info.bytes  # GB/s -> GOP/s
        cells = []
        for b in builds:
            v = sorted(r[qtype] * per_gb for r in results[b])
            cells.append(f"{statistics.median(v):8.1f} ({v[0]:.1f}-{v[-1]:.1f})")
        print(f"{qtype:6s} " + " ".join(f"{c:>22s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
