"""The fused decode step's speed under the kernels' run-time knobs, A/B in one process on the same weights.

Run:  python benchmarks/decode_knobs.py FILE.gguf [FILE.gguf ...] [--threads 2] [--rounds 12] [--steps 4]
          [--variants decode_chunk_bytes=0 decode_chunk_bytes=65536 ...]

Each variant is a comma-separated list of `knob=value` for the C++ extension's setters (`decode_chunk_bytes`:
0 = each thread a static half of every decode matmul, else guided chunks from a shared counter;
`float_prefetch`: bytes of software prefetch ahead in the float tiles; `min_bytes_per_thread`). After a 16-token
prompt, blocks of `--steps` one-token steps (batch 1) run under each variant in turn, the order reversed every
round, so that whatever else the machine does falls on all of them alike; per variant the median and fastest
step (wall), the median CPU time (the one to read on one thread on a busy machine), GB/s = weight bytes /
median step, and its share of the read bandwidth that benchmarks/bandwidth.py's probe measures at the same
thread count (`--no-probe` skips it). Same file, same tokens: the variants' greedy tokens must agree (they are
printed as a check). Not run by the tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.append(str(Path(__file__).resolve().parent))  # compare_steps' helpers, after the packages


def parse_variant(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if not value.strip().lstrip("-").isdigit():
            raise SystemExit(f"decode_knobs: --variants items are knob=integer, got {item!r}")
        out[name.strip()] = int(value)
    return out


def run_file(path: str, variants: list[dict[str, int]], rounds: int, steps: int) -> list[dict]:
    import torch

    from compare_steps import LlamaforgeSteps
    from llamaforge import kernels
    from llamaforge.model import StepInput

    ext = kernels.get_extension()
    if ext is None:
        raise SystemExit("decode_knobs: the C++ kernels are not available here")
    for v in variants:
        for name in v:
            if not callable(getattr(ext, name, None)):
                raise SystemExit(f"decode_knobs: the extension has no knob {name!r}")
    total = rounds * steps * len(variants)
    s = LlamaforgeSteps({"model": path, "prompt_lens": [16], "steps": total, "long_steps": 0, "batches": [1]})
    llm = s.llm
    cache = llm.decode_step.new_cache(1, 16 + total + 2)
    defaults = {name: getattr(ext, name)() for v in variants for name in v}
    times: list[list[tuple[float, float]]] = [[] for _ in variants]
    with torch.inference_mode():
        nxt = s.model(torch.tensor([list(range(100, 116))]), 0, cache, last_only=True)[:, -1].argmax(-1)
        pos = 16
        for r in range(rounds):
            order = range(len(variants)) if r % 2 == 0 else reversed(range(len(variants)))
            for j in order:
                for name, value in (defaults | variants[j]).items():
                    getattr(ext, name)(value)
                for _ in range(steps):
                    w0, c0 = time.perf_counter(), time.process_time()
                    step = StepInput.make(pos, 1, 1, device=torch.device("cpu"), cache_len=cache.max_seq_len)
                    nxt = llm.decode_step(nxt.view(1, 1), step, cache)[:, -1].argmax(-1)
                    times[j].append((time.perf_counter() - w0, time.process_time() - c0))
                    pos += 1
    for name, value in defaults.items():
        getattr(ext, name)(value)
    nbytes = s.weight_bytes()[0]
    rows = []
    for v, ts in zip(variants, times):
        wall = statistics.median(t[0] for t in ts)
        rows.append({"variant": ",".join(f"{k}={x}" for k, x in v.items()) or "(defaults)",
                     "wall_ms": 1e3 * wall, "best_ms": 1e3 * min(t[0] for t in ts),
                     "cpu_ms": 1e3 * statistics.median(t[1] for t in ts), "gbs": nbytes / wall / 1e9,
                     "best_gbs": nbytes / min(t[0] for t in ts) / 1e9})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    ap.add_argument("--variants", nargs="+", default=["decode_chunk_bytes=0", "decode_chunk_bytes=65536"])
    ap.add_argument("--no-probe", action="store_true", help="skip the bandwidth probe")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    variants = [parse_variant(v) for v in a.variants]
    load0 = os.getloadavg()[0]
    results = {f: run_file(f, variants, a.rounds, a.steps) for f in a.files}
    bw = None
    if not a.no_probe:
        from bandwidth import probe

        bw = probe(a.threads)["read_gbs"]
    print(f"\n{a.threads} thread(s), {a.rounds} rounds x {a.steps} steps per variant, load average {load0:.1f} -> "
          f"{os.getloadavg()[0]:.1f}" + (f"; probe read bandwidth {bw:.1f} GB/s" if bw else ""))
    print("| file | variant | step ms median (best) | CPU ms median | GB/s median (best) |" + (" % of bw |" if bw else ""))
    print("|---|---|---|---|---|" + ("---|" if bw else ""))
    for f, rows in results.items():
        for r in rows:
            print(f"| {Path(f).name} | {r['variant']} | {r['wall_ms']:.1f} ({r['best_ms']:.1f}) | {r['cpu_ms']:.1f} | "
                  f"{r['gbs']:.1f} ({r['best_gbs']:.1f}) |" + (f" {100 * r['gbs'] / bw:.0f}% |" if bw else ""))


if __name__ == "__main__":
    main()
