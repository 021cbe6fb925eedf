"""Where a load's CPU goes, by thread: what two cores can overlap in `Llama.build` (api/build.beside_own_thread).

    OMP_NUM_THREADS=1 python benchmarks/load_profile.py FILE.gguf [FILE.gguf ...] [--repeats 3]

For each file and repeat, a fresh process builds the model (x8 cache as configured: run once beforehand so the
cache file exists) and runs one token, and reports the CPU seconds of each part on the thread that ran it:
the GGUF header, the text side (tokenizer + chat format, caller's thread), the weights side (runtime.prepare,
its own thread: x8 cache check, page faults, module surgery), the rest of the build and the first forward.
"sequential" is their sum; "two cores" is header + max(text, weights) + rest + first forward, what the
load's wall time tends to on two idle cores. CPU seconds per thread are robust on a loaded machine where wall
figures are not; they still include the page faults of a file the page cache had dropped. Not run by tests.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time


def child(path: str) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from llamaforge import Llama, checkpoints, runtime
    from llamaforge.api import build as build_module
    from llamaforge.kernels import get_extension
    from llamaforge.tokenizer import Tokenizer

    get_extension()
    spent: dict[str, float] = collections.defaultdict(float)
    lock = threading.Lock()

    def timed(label, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            c = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                with lock:
                    spent[label] += time.thread_time() - c
        return wrapper

    checkpoints.load = timed("header", checkpoints.load)
    runtime.prepare = timed("weights", runtime.prepare)
    from_source = Tokenizer.from_source.__func__
    Tokenizer.from_source = classmethod(timed("text", lambda cls, *a, **k: from_source(cls, *a, **k)))
    build_module.chat_format_for = timed("text", build_module.chat_format_for)
    c0 = time.process_time()
    llm = Llama.build(path, max_seq_len=256, max_batch_size=1, device="cpu", progress=False)
    c1 = time.process_time()
    with torch.inference_mode():
        llm.model(torch.tensor([[1]]), 0)
    res = dict(spent, first_forward=time.process_time() - c1)
    res["rest"] = c1 - c0 - res["header"] - res["weights"] - res["text"]
    res["sequential"] = c1 - c0 + res["first_forward"]
    res["two_cores"] = res["header"] + max(res["text"], res["weights"]) + res["rest"] + res["first_forward"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.files[0])), flush=True)
        return
    keys = ("header", "text", "weights", "rest", "first_forward", "sequential", "two_cores")
    print("| file | " + " | ".join(f"{k} CPU s" for k in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for path in a.files:
        runs = []
        for _ in range(a.repeats):
            out = subprocess.run([sys.executable, __file__, "--child", path], capture_output=True, text=True,
                                 timeout=600)
            lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if not lines:
                sys.exit(f"{path} failed:\n{out.stderr[-3000:]}")
            runs.append(json.loads(lines[-1][7:]))
        print(f"| {os.path.basename(path)} | " + " | ".join(
            f"{statistics.median(r[k] for r in runs):.3f}" for k in keys) + " |", flush=True)
    print(f"\nmedians of {a.repeats} fresh processes; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
