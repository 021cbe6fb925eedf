"""Decode-step cost at long context for each KV cache element type (float32, float16, bfloat16, q8_0).

Builds a GGUF model once (default: the 1B shape's Q4_K_M from benchmarks/shapes.py's cache), then for each KV
type a one-slot cache whose positions [0, context) hold random rows stored in that type (the speed of a decode
step does not depend on the values), and times one-token steps of the fused decode step at positions
context, context + 1, ... in CPU time of this process (run it with OMP_NUM_THREADS=1: then CPU seconds are
what the step costs, whatever else the machine runs). Types alternate within each round, rounds repeat, and
the table gives the median per (type, context), the ratio to float32 and the KV bytes each step reads.
Not run by the tests.

    OMP_NUM_THREADS=1 python benchmarks/kv_types.py                       # 1B Q4_K_M, contexts 128,2048,4096
    OMP_NUM_THREADS=1 python benchmarks/kv_types.py --model x.gguf --contexts 4096 --types float32,q8_0
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def default_model() -> Path:
    sys.path.append(str(Path(__file__).resolve().parent))
    from shapes import cache_dir

    return cache_dir() / "llama-1b-random.Q4_K_M.gguf"


def fill(cache, context: int, gen) -> None:
    """Random rows at positions [0, context) of slot 0, stored in the cache's type (layer by layer)."""
    import torch

    from llamaforge.model import kv_types

    n_layers, _, n_kv, _, _ = cache.k.shape
    for layer in range(n_layers):
        for t in (cache.k, cache.v):
            x = torch.randn(n_kv, context, cache.head_dim, generator=gen)
            t[layer, 0, :, :context] = kv_types.encode(x, cache.kv_type)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="GGUF file (default: the 1B shape's Q4_K_M)")
    p.add_argument("--types", default="float32,float16,q8_0", help="KV types, comma-separated")
    p.add_argument("--contexts", default="128,2048,4096", help="cached positions before the timed steps")
    p.add_argument("--steps", type=int, default=6, help="timed steps per (type, context, round)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the types alternate within each")
    a = p.parse_args(argv)
    import torch

    from llamaforge import Llama
    from llamaforge.model import StepInput, kv_types
    from llamaforge.runtime import DecodeStep

    types = [kv_types.check_kv_type(t, name="--types") for t in a.types.split(",")]
    contexts = [int(c) for c in a.contexts.split(",")]
    model_path = a.model or default_model()
    length = max(contexts) + a.steps + 1
    llm = Llama.build(str(model_path), max_seq_len=length, max_batch_size=1, device="cpu", progress=False)
    model, args = llm.model, llm.model.args
    steps = {t: DecodeStep(model, fused=True, kv_type=t) for t in types}
    caches = {t: steps[t].new_cache(1, length) for t in types}
    gen = torch.Generator().manual_seed(0)
    for t in types:
        fill(caches[t], max(contexts), gen)
    times: dict[tuple[str, int], list[float]] = {(t, c): [] for t in types for c in contexts}
    token = torch.tensor([[1]])
    with torch.inference_mode():
        for _ in range(a.rounds):
            for c in contexts:
                for t in types:
                    step, cache = steps[t], caches[t]
                    step(token, StepInput.make(c, 1, 1, device=torch.device("cpu"), cache_len=length), cache)  # warm
                    for i in range(a.steps):
                        at = StepInput.make(c + i, 1, 1, device=torch.device("cpu"), cache_len=length)
                        t0 = time.process_time()
                        step(token, at, cache)
                        times[(t, c)].append(time.process_time() - t0)
                    assert step.ran_fused, "the fused step did not run"
    print(f"## KV cache types: {model_path.name}, {args.n_layers} layers x {args.n_kv_heads} KV heads x "
          f"head_dim {args.head_dim}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"{a.rounds} rounds x {a.steps} steps, CPU ms per decode step (median)\n")
    print("| context | " + " | ".join(types) + " | KV MB read per step (" + ", ".join(types) + ") |")
    print("|---|" + "---|" * len(types) + "---|")
    for c in contexts:
        base = statistics.median(times[(types[0], c)])
        cells = []
        for t in types:
            m = statistics.median(times[(t, c)])
            cells.append(f"{1e3 * m:.1f}" + ("" if t == types[0] else f" ({base / m:.2f}x)"))
        mb = [2 * args.n_layers * args.n_kv_heads * kv_types.row_bytes(t, args.head_dim) * c / 1e6 for t in types]
        print(f"| {c} | " + " | ".join(cells) + " | " + ", ".join(f"{x:.0f}" for x in mb) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
