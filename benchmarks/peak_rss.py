"""Peak RSS of llamaforge's matrix cell over its weights + KV cache, as `matrix_report.rss_over` reads it.

    python benchmarks/peak_rss.py Q4_0 --threads 1 --prompt 4096 [--shape 1b] [--env NAME=VALUE ...]

Runs compare_steps.py's llamaforge process (batch 1, one prompt length, 12 decode steps, 8 after a long
prompt) on the shape file made by shapes.py, in a fresh process with this tree's `llamaforge` first on
PYTHONPATH, and prints (peak VmHWM - VmRSS after imports) / (bytes of weights held + KV bytes of the cell's
positions), with a hash of the greedy tokens (the same hash at two trees: the same tokens). RSS is no timing:
a busy machine does not move it much. Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare import TEXT, default_model  # noqa: E402
from compare_shapes import long_prompt  # noqa: E402
from shapes import SHAPES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("type", help="GGUF type of the shape file, e.g. Q4_0, Q4_K_M")
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the cell's process")
    args = ap.parse_args()
    from llamaforge.tokenizer import Tokenizer

    f = Path.home() / f".cache/llamaforge/bench-shapes/llama-{args.shape}-random.{args.type}.gguf"
    if not f.is_file():
        sys.exit(f"{f} is missing: python benchmarks/shapes.py {args.shape} --types {args.type}")
    p, steps, long_steps = args.prompt, 12, 8
    cfg = {"engine": "llamaforge", "model": str(f), "threads": args.threads, "prompt_lens": [p],
           "prompts": {str(p): long_prompt(Tokenizer.from_file(default_model()), TEXT, p)}, "batches": [1],
           "plan": [[p, 1]], "steps": steps, "long_steps": long_steps, "runs": 3, "flash_attn": False}
    tree = str(HERE.parent)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([tree] + [x for x in [os.environ.get("PYTHONPATH")] if x])}
    env.update(dict(e.split("=", 1) for e in args.env))
    out = subprocess.run([sys.executable, str(HERE / "compare_steps.py"), "-"], input=json.dumps(cfg), text=True,
                         capture_output=True, env=env)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    res = json.loads(lines[-1][len("RESULT "):]) if lines else {"error": out.stderr[-2000:]}
    if "error" in res:
        sys.exit(f"the cell failed: {res['error']}")
    positions = p + max(steps, long_steps) + 4  # matrix_report.rss_over's positions
    need = res["bytes_held"] + res["kv_bytes_per_position"] * positions
    over = res["peak_rss_mb"] - res["rss_after_imports_mb"]
    cell = res["cells"][f"{p}x1"]
    print(f"{args.shape} {args.type} threads {args.threads} prompt {p}: peak {res['peak_rss_mb']:.1f} MiB, over imports "
          f"{over:.1f}, weights {res['bytes_held'] / 2**20:.1f} + KV {res['kv_bytes_per_position'] * positions / 2**20:.1f}"
          f" MiB: ratio {over * 2**20 / need:.3f}; prefill {cell['prefill_tok_s']:.1f} tok/s; "
          f"tokens hash {hash(tuple(cell['tokens']))}")


if __name__ == "__main__":
    main()
