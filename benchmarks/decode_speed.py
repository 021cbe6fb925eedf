"""Decode speed of the default model through the public API (tokens per second after the first).

Used to check that a change to the decode path adds no per-token overhead: run it before and after (or with
PYTHONPATH at another checkout) and compare the medians. On a shared, busy machine wall-clock rates mostly
measure the neighbours; `--cpu-time` (one thread) counts the CPU time this process (all its threads) spent
instead, which moves far less with the load. Prints one JSON line.

    PYTHONPATH=. python benchmarks/decode_speed.py --tokens 64 --repeats 5
    PYTHONPATH=. python benchmarks/decode_speed.py --cpu-time --dtype float32 --batch 4
    PYTHONPATH=. python benchmarks/decode_speed.py --threads 2 --sampled-batch-first

Batch 1 streams one prompt (`Llama.stream_tokens`); `--batch B` times `Llama.generate` of B prompts,
greedy, as decode tok/s = B * (N - 1) / (T(N tokens) - T(1 token)). `--sampled-batch-first` runs a sampled
batch of two prompts (Meta's lock-step mode) before timing, as a caller mixing both would: where that work
ran on the caller's thread, its OpenMP pool slowed every later engine step (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

PROMPTS = ["The history of the printing press", "Photosynthesis is the process", "A good cup of tea needs",
           "The rules of chess say that"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens to generate per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs; the median and best are reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cpu-time", action="store_true", help="one thread, rates in tokens per CPU second")
    parser.add_argument("--dtype", default=None, help="Llama.build's dtype (float32: the dequantized reference path)")
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together (at most 4)")
    parser.add_argument("--sampled-batch-first", action="store_true",
                        help="run a sampled batch of two prompts (Meta's lock-step mode) before timing")
    opts = parser.parse_args()
    if opts.cpu_time:
        opts.threads = 1
    if opts.threads:
        torch.set_num_threads(opts.threads)
    clock = time.process_time if opts.cpu_time else time.perf_counter  # process: every thread, the engine's too
    from llamaforge import Llama

    llama = Llama.build(max_seq_len=256, max_batch_size=4, dtype=opts.dtype, progress=False)
    prompts = [llama.tokenizer.encode(p, bos=llama.tokenizer.add_bos, eos=False) for p in PROMPTS[: opts.batch]]
    if opts.sampled_batch_first:
        llama.generate(prompts[:1] * 2, max_gen_len=16, temperature=0.6, top_p=0.9)
    rates = []
    for _ in range(opts.repeats + 1):  # the first run warms up
        rates.append(_stream_rate(llama, prompts[0], opts.tokens, clock) if opts.batch == 1
                     else _batch_rate(llama, prompts, opts.tokens, clock))
    rates = rates[1:]
    print(json.dumps({"tokens": opts.tokens, "batch": opts.batch, "dtype": opts.dtype or "default",
                      "median_tok_s": round(statistics.median(rates), 1), "best_tok_s": round(max(rates), 1),
                      "runs": [round(r, 1) for r in rates], "threads": torch.get_num_threads(),
                      "sampled_batch_first": opts.sampled_batch_first, "clock": "cpu" if opts.cpu_time else "wall"}))


def _stream_rate(llama, prompt: list[int], tokens: int, clock) -> float:
    n, start = 0, None
    for _token in llama.stream_tokens(prompt, tokens, temperature=0.0, stop_ids=[]):
        if start is None:
            start = clock()  # after prefill and the first token
        else:
            n += 1
    return n / (clock() - start)


def _batch_rate(llama, prompts: list[list[int]], tokens: int, clock) -> float:
    def timed(n: int) -> float:
        start = clock()
        llama.generate(prompts, max_gen_len=n, temperature=0.0, stop_ids=[])
        return clock() - start

    return len(prompts) * (tokens - 1) / max(1e-9, timed(tokens) - timed(1))


if __name__ == "__main__":
    main()
