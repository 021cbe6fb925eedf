"""Batch-1 decode speed of the default model through the public API (tokens per second after the first).

Used to check that a change to the decode path adds no per-token overhead: run it before and after and compare
the medians. On a shared, busy machine wall-clock rates mostly measure the neighbours; `--cpu-time` (one thread)
counts the CPU time this process (all its threads) spent instead, which moves far less with the load. Prints one JSON line.

    PYTHONPATH=. python benchmarks/decode_speed.py --tokens 64 --repeats 5
    PYTHONPATH=. python benchmarks/decode_speed.py --cpu-time
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens to generate per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs; the median and best are reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cpu-time", action="store_true", help="one thread, rates in tokens per CPU second")
    opts = parser.parse_args()
    if opts.cpu_time:
        opts.threads = 1
    if opts.threads:
        torch.set_num_threads(opts.threads)
    clock = time.process_time if opts.cpu_time else time.perf_counter  # process: every thread, the engine's too
    from llamaforge import Llama

    llama = Llama.build(max_seq_len=256, max_batch_size=1, progress=False)
    prompt = llama.tokenizer.encode("The history of the printing press", bos=llama.tokenizer.add_bos, eos=False)
    rates = []
    for _ in range(opts.repeats + 1):  # the first run warms up
        n, start = 0, None
        for _token in llama.stream_tokens(prompt, opts.tokens, temperature=0.0, stop_ids=[]):
            if start is None:
                start = clock()  # after prefill and the first token
            else:
                n += 1
        rates.append(n / (clock() - start))
    rates = rates[1:]
    print(json.dumps({"tokens": opts.tokens, "median_tok_s": round(statistics.median(rates), 1),
                      "best_tok_s": round(max(rates), 1), "runs": [round(r, 1) for r in rates],
                      "threads": torch.get_num_threads(),
                      "clock": "cpu" if opts.cpu_time else "wall"}))


if __name__ == "__main__":
    main()
