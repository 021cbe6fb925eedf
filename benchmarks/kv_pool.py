"""The KV block pool's costs: engine decode speed at batch 1 and 8, and the memory a default server takes.

Decode: the default model through `Llama.engine` (the continuous-batching engine every front end uses), B
greedy requests submitted together; the rate counts the tokens generated after every request has its first
one (prefill excluded), per CPU second of the whole process on one thread (`--cpu-time`, the default: on a
shared machine wall-clock rates measure the neighbours), or per wall second. Prints one JSON line.

    PYTHONPATH=. python benchmarks/kv_pool.py decode --batch 1 8 --tokens 64 --repeats 5
    PYTHONPATH=. python benchmarks/kv_pool.py memory            # RSS of `llamaforge serve` (default budget)

To compare two trees, alternate them in one shell loop (A, B, A, B, ...) and compare the medians:

    for i in 1 2 3; do for t in /path/to/main /path/to/branch; do
        PYTHONPATH=$t python benchmarks/kv_pool.py decode; done; done

Memory: starts `python -m llamaforge serve` with the default KV budget (a tenth of the free memory), reads
its resident set size (VmRSS) once it is healthy, then after 16 concurrent streaming completions of 64
greedy tokens, and prints both with the line the server printed about its KV cache.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

TOPICS = ["The history of the printing press", "How bees make honey", "A short story about a lighthouse",
          "Why the sky is blue", "The rules of chess", "A recipe for bread", "The life of a star",
          "How a bicycle works", "The causes of rain", "A letter to a friend"]


def decode(opts: argparse.Namespace) -> None:
    import torch

    if opts.wall:
        clock = time.perf_counter
    else:
        torch.set_num_threads(1)
        clock = time.process_time  # every thread of the process, the engine's too
    from llamaforge import Llama
    from llamaforge.generation.jobs import Delta, Finish, Job
    from llamaforge.generation.sampler import SamplingParams

    llama = Llama.build(max_seq_len=512, max_batch_size=max(opts.batch), progress=False)
    engine = llama.engine
    out = {"tokens": opts.tokens, "clock": "wall" if opts.wall else "cpu", "threads": torch.get_num_threads()}
    for bsz in opts.batch:
        prompts = [llama.tokenizer.encode(f"{TOPICS[i % len(TOPICS)]} ({i})", bos=llama.tokenizer.add_bos, eos=False)
                   for i in range(bsz)]
        rates = []
        for _ in range(opts.repeats + 1):  # the first run warms up
            state = {"first": 0, "n": 0, "start": None, "left": bsz}
            done = threading.Event()

            def sink(ev, state=state, done=done, bsz=bsz):  # on the engine thread
                if isinstance(ev, Delta) and ev.tokens:
                    if state["start"] is not None:
                        state["n"] += len(ev.tokens)
                    else:
                        state["first"] += 1
                        if state["first"] == bsz:
                            state["start"] = clock()
                elif isinstance(ev, Finish):
                    state["left"] -= 1
                    if state["left"] == 0:
                        state["end"] = clock()
                        done.set()

            jobs = [Job(p, opts.tokens, SamplingParams(temperature=0), detokenize=False) for p in prompts]
            engine.submit_all(jobs, [sink] * bsz)
            done.wait()
            rates.append(state["n"] / (state["end"] - state["start"]))
        rates = rates[1:]
        out[f"batch{bsz}_median_tok_s"] = round(statistics.median(rates), 1)
        out[f"batch{bsz}_runs"] = [round(r, 1) for r in rates]
    print(json.dumps(out))


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def memory(opts: argparse.Namespace) -> None:
    from pathlib import Path

    import httpx

    import llamaforge

    tree = Path(llamaforge.__file__).resolve().parents[1]  # `-m` puts the cwd first: run in the tree measured
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llamaforge", "serve", "--port", str(port), "--device", "cpu",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tree, env={**os.environ, "OMP_NUM_THREADS": str(opts.threads)})
    base = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        idle = _rss_kib(proc.pid)

        def one(i: int) -> None:
            httpx.post(base + "/v1/completions", timeout=600, json={
                "prompt": f"{TOPICS[i % len(TOPICS)]} ({i})", "max_tokens": 64, "temperature": 0})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        loaded = _rss_kib(proc.pid)
    finally:
        proc.send_signal(2)
        proc.wait(timeout=60)
    kv = next((line.strip() for line in lines if "KV cache" in line), None)
    print(json.dumps({"rss_idle_mib": round(idle / 1024, 1), "rss_after_16_requests_mib": round(loaded / 1024, 1),
                      "kv_line": kv}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    d = sub.add_parser("decode", help="engine decode tokens per CPU second at each batch size")
    d.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    d.add_argument("--tokens", type=int, default=64, help="tokens each request generates")
    d.add_argument("--repeats", type=int, default=5, help="runs per batch size after a warm-up; the median is shown")
    d.add_argument("--wall", action="store_true", help="wall-clock rates with torch's default threads")
    m = sub.add_parser("memory", help="resident memory of a default `llamaforge serve`")
    m.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()
    decode(opts) if opts.what == "decode" else memory(opts)


if __name__ == "__main__":
    main()
