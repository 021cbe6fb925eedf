"""Batch-1 decode step CPU time on one thread, A/B between source trees (and llama.cpp), alternating.

Run:  python benchmarks/decode_ab.py FILE.gguf [FILE.gguf ...] --trees /work/main . [--llama-cpp]
                                     [--rounds 3] [--steps 12] [--prompt-len 16] [--avx2]

Each round runs, for every file, one process per tree (PYTHONPATH=tree, so that tree's kernels are
built and used) and optionally one llama.cpp process, in turn, through benchmarks/compare_steps.py
(`Llama.build(file)`, a prefill of `--prompt-len` tokens, then `--steps` one-token decode steps, each
timed). Load (wall seconds of the build) and peak RSS are printed too. The figure is the median over rounds of each process's median step, in process CPU
milliseconds with one thread (robust to other jobs on a shared machine, which disturb it only through
the memory bus and caches), with decode tok/s = 1000 / ms and GB/s = weight bytes per token / step.
`--avx2` sets LLAMAFORGE_X8_TILES=avx2 for the llamaforge processes (the AVX2 tiles on an AVX-512 CPU,
as AVX2-only CPUs run them; a tree without that switch ignores it). Files: benchmarks/shapes.py makes
them (`python benchmarks/compare.py --shape 1b` does on first use). Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one(file: Path, engine: str, tree: Path | None, args: argparse.Namespace) -> dict:
    cfg = {"engine": engine, "model": str(file), "threads": 1, "prompt_lens": [args.prompt_len], "batches": [1],
           "steps": args.steps, "long_steps": args.steps, "runs": 1, "flash_attn": True,
           "prompts": {str(args.prompt_len): list(range(100, 100 + args.prompt_len))}}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
        if args.avx2:
            env["LLAMAFORGE_X8_TILES"] = "avx2"
    out = subprocess.run([sys.executable, str(HERE / "compare_steps.py"), json.dumps(cfg)], env=env,
                         capture_output=True, text=True, timeout=1800).stdout
    res = json.loads(out.split("RESULT ", 1)[1])
    if "error" in res:
        raise SystemExit(f"{engine} {tree or ''} on {file.name}: {res['error']}")
    cell = res["cells"][f"{args.prompt_len}x1"]
    return {"ms": 1e3 / cell["decode_cpu_tok_s"], "bytes": res["bytes_per_token"], "load_s": res["load_s"],
            "rss_mb": res["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--trees", type=Path, nargs="+", default=[HERE.parent], help="llamaforge source roots")
    parser.add_argument("--llama-cpp", action="store_true", help="also time llama.cpp (llama-cpp-python, FA on)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--avx2", action="store_true", help="force llamaforge's AVX2 tiles (LLAMAFORGE_X8_TILES=avx2)")
    args = parser.parse_args()
    engines = [(str(t), "llamaforge", t.resolve()) for t in args.trees]
    if args.llama_cpp:
        engines.append(("llama.cpp", "llama.cpp", None))
    print(f"1 thread, process CPU ms per decode step after {args.prompt_len} tokens, median of {args.rounds} "
          f"rounds x {args.steps} steps; {'AVX2' if args.avx2 else 'default'} tiles; load average "
          f"{os.getloadavg()[0]:.1f} at the start", flush=True)
    for file in args.files:
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in engines}
        for _ in range(args.rounds):
            for name, engine, tree in engines:
                runs[name].append(one(file, engine, tree, args))
        cells = []
        for name in runs:
            ms = statistics.median(r["ms"] for r in runs[name])
            gbs = runs[name][0]["bytes"] / ms / 1e6
            load = statistics.median(r["load_s"] for r in runs[name])
            cells.append(f"{name}: {ms:.1f} ms = {1e3 / ms:.2f} tok/s, {gbs:.1f} GB/s "
                         f"({min(r['ms'] for r in runs[name]):.1f}-{max(r['ms'] for r in runs[name]):.1f}); "
                         f"load {load:.1f} s, peak RSS {max(r['rss_mb'] for r in runs[name]):.0f} MiB")
        print(f"{file.name}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
