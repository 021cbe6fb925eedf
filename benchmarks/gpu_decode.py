"""Batch-1 decode on a CUDA GPU against the HBM bandwidth bound (issue 15, item 7).

    python benchmarks/gpu_decode.py                    # 8B shape, bf16: eager, compiled, compiled int8
    python benchmarks/gpu_decode.py --shape 1b --variants eager,compiled --steps 32

A Llama-shaped model with random weights (speed does not depend on their values) is made on the GPU in
bfloat16 (no file, no download). For each variant it prefills a prompt, then times one-token steps of the
`DecodeStep` the engine calls (torch.cuda.synchronize around each), after warm-up steps that also compile.
Each step must read every weight once (the token embedding: one row) and the KV cache it attends over, so
the bound is (those bytes) / (the GPU's measured copy bandwidth); the table gives tok/s, the bytes per token
and the achieved share of the bound. The issue's target: bf16 8B batch 1 >= 80% of the bound.

Prints a markdown table and, with --json (default $OUT/gpu_decode.json when $OUT is set), writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from shapes import SHAPES  # noqa: E402

from llamaforge.model import KVCache, ModelArgs, StepInput, Transformer  # noqa: E402
from llamaforge.quantize import quantize_model_weights  # noqa: E402
from llamaforge.runtime import DecodeStep  # noqa: E402

VOCAB = 128256  # Llama 3's vocabulary


def measured_bandwidth(gib: float = 2.0, repeats: int = 10) -> float:
    """Device-to-device copy rate in bytes/s (each copy reads and writes `gib`), best of `repeats`."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    del src, dst
    return 2 * n * 2 / best


def make_model(shape_name: str, max_seq_len: int, device: str = "cuda") -> Transformer:
    s = SHAPES[shape_name]
    args = ModelArgs(dim=s.dim, n_layers=s.n_layers, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads,
                     vocab_size=VOCAB, hidden_dim=s.ffn, norm_eps=1e-5, rope_theta=500000.0,
                     max_seq_len=max_seq_len, tie_embeddings=s.tied)
    with torch.device("meta"):
        model = Transformer(args, max_seq_len)
    model = model.to_empty(device=device).to(torch.bfloat16).eval()
    if s.tied:
        model.output.weight = model.tok_embeddings.weight
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.rope.reset_tables(torch.device(device))  # float32 tables, not to_empty's garbage
    return model


def bytes_per_token(model: Transformer, context: int) -> int:
    """What one step must read: every weight once (one row of the token embedding) and the KV cache."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("tok_embeddings") and not model.args.tie_embeddings:
            total += t[0].numel() * t.element_size()
        elif not name.startswith("rope"):
            total += t.numel() * t.element_size()
    a = model.args
    return total + 2 * a.n_layers * a.n_kv_heads * a.head_dim * context * 2  # K and V in bf16


def time_variant(model: Transformer, compiled: bool, prompt: int, steps: int, warmup: int, max_seq_len: int):
    step = DecodeStep(model, compiled=compiled)
    cache = KVCache.for_model(model.args, 1, max_seq_len, dtype=torch.bfloat16, device=torch.device("cuda"))
    tokens = torch.randint(0, VOCAB, (1, prompt), device="cuda")
    times = []
    with torch.inference_mode():
        model(tokens, 0, cache, last_only=True)  # prefill
        tok = torch.randint(0, VOCAB, (1, 1), device="cuda")
        compile_s = time.perf_counter()
        for i in range(warmup + steps):
            pos = prompt + i
            st = StepInput.make(torch.tensor([[pos]], device="cuda"), 1, 1, device=torch.device("cuda"),
                                cache_len=max_seq_len, kv_len=pos + 1)
            torch.cuda.synchronize()
            t = time.perf_counter()
            logits = step(tok, st, cache)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            if i == warmup - 1:
                compile_s = time.perf_counter() - compile_s
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), compile_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    p.add_argument("--variants", default="eager,compiled,compiled-int8",
                   help="eager, compiled (torch.compile + CUDA graphs), compiled-int8 (int8 weights)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--json", default=os.path.join(os.environ["OUT"], "gpu_decode.json") if os.environ.get("OUT") else None)
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_decode.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    bw = measured_bandwidth()
    gpu = torch.cuda.get_device_name()
    rows = []
    for variant in a.variants.split(","):
        model = make_model(a.shape, a.max_seq_len)
        if variant.endswith("int8"):
            quantize_model_weights(model, "int8")
        context = a.max_seq_len if variant.startswith("compiled") else a.prompt + a.steps // 2
        need = bytes_per_token(model, context)  # the compiled step reads the whole (static) cache
        try:
            med, best, compile_s = time_variant(model, variant.startswith("compiled"), a.prompt, a.steps, a.warmup,
                                                a.max_seq_len)
        except Exception as exc:  # report and go on: one variant failing must not hide the others
            rows.append({"variant": variant, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"{variant}: failed: {rows[-1]['error']}", flush=True)
            continue
        rows.append({"variant": variant, "tok_s": 1 / med, "best_tok_s": 1 / best, "gb_per_token": need / 1e9,
                     "achieved_gb_s": need / med / 1e9, "share_of_bound": need / med / bw,
                     "warmup_s": compile_s})
        print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    print(f"\n{gpu}, {a.shape} shape bf16, batch 1, prompt {a.prompt}, {a.steps} steps; measured copy bandwidth "
          f"{bw / 1e9:.0f} GB/s; torch {torch.__version__}\n")
    print("| variant | tok/s (best) | GB read / token | GB/s | % of bound | warm-up s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error'][:80]} | | | | |")
        else:
            print(f"| {r['variant']} | {r['tok_s']:.1f} ({r['best_tok_s']:.1f}) | {r['gb_per_token']:.2f} | "
                  f"{r['achieved_gb_s']:.0f} | {100 * r['share_of_bound']:.0f}% | {r['warmup_s']:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"gpu": gpu, "bandwidth_b_s": bw, "shape": a.shape, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
