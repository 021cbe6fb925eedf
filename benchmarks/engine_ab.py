"""In-process A/B of the serving engine in CPU time: base model vs K LoRA adapters vs JSON-schema output.

    python benchmarks/serve_load.py --in-process --streams 16 --loras 8 --repeats 3
    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --in-process --variants base,json-free,json

The engine of `Llama` (the one `llamaforge serve` runs; prefix reuse off) gets N requests at once per run, one
run per variant, the variants alternating (the order rotated every repeat) so that a loaded machine's slow
minutes fall on all of them alike. Each run reports the tokens generated per second of process CPU time (all
threads: what the run cost, whatever else the machine did) and per second of wall time; the summary gives
medians and each variant's ratio to its baseline. Variants:
- `base`: N greedy completions of different prompts, no adapter;
- `loras`: the same requests, request i on random adapter i mod K (rank 8 on every projection), all in one batch;
- `json-free`: N greedy completions of prompts asking for a JSON record, unconstrained;
- `json`: the same with `response_format` json_schema (llguidance), a schema whose string field must be long
  enough that every request runs to `--max-tokens`, as the unconstrained ones do (no stop token is allowed
  before the JSON ends, and stop tokens are off in `json-free`), so both generate the same number of tokens.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

JSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "biography": {"type": "string", "minLength": 400}},
    "required": ["name", "age", "biography"],
}
JSON_PROMPTS = ["Write a JSON record of a famous scientist: ", "A JSON record of a fictional pirate: ",
                "Describe a chef as JSON: ", "Here is a JSON record of a king: "]
BASELINE = {"base": None, "loras": "base", "json-free": None, "json": "json-free"}


def run_burst(engine, jobs) -> tuple[int, float, float, list, list]:
    """Submit every job at once; wait for all to finish.

    -> (tokens, CPU s, wall s, token lists, per job (CPU s, wall s) from the submission to its first token)."""
    from llamaforge.generation.jobs import Delta, Failure, Finish

    tokens = [[] for _ in jobs]
    first = [None] * len(jobs)
    left = threading.Semaphore(0)
    errors = []

    def sink_for(i):
        def sink(ev):
            if isinstance(ev, Delta):
                if first[i] is None:
                    first[i] = (time.process_time(), time.perf_counter())
                tokens[i].extend(t.id for t in ev.tokens)
            elif isinstance(ev, Finish):
                left.release()
            elif isinstance(ev, Failure):
                errors.append(ev.message)
                left.release()
        return sink

    cpu, wall = time.process_time(), time.perf_counter()
    engine.submit_all(jobs, [sink_for(i) for i in range(len(jobs))])
    for _ in jobs:
        if not left.acquire(timeout=600):
            raise SystemExit("a request did not finish within 600 s")
    ttft = [(c - cpu, w - wall) for c, w in first]
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if errors:
        raise SystemExit(f"requests failed: {errors[:3]}")
    return sum(map(len, tokens)), cpu, wall, tokens, ttft


def main(args, prompts: list[str], write_random_lora) -> int:
    """Run the A/B for serve_load.py's parsed `args` (see `--in-process`); prints the runs and a summary."""
    import torch

    from llamaforge import Llama
    from llamaforge.generation.jobs import Job
    from llamaforge.generation.sampler import SamplingParams

    variants = args.variants.split(",")
    unknown = set(variants) - set(BASELINE)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}: choose from {sorted(BASELINE)}")
    if "loras" in variants and not args.loras:
        args.loras = 8
    n = args.streams
    llama = Llama.build(args.model, max_seq_len=args.max_seq_len, max_batch_size=n)
    tmp = tempfile.TemporaryDirectory(prefix="engine_ab_loras_")
    for i in range(args.loras if "loras" in variants else 0):
        llama.load_adapter(f"lora{i}", write_random_lora(args.model, Path(tmp.name) / f"lora{i}", seed=i,
                                                         dtype=args.lora_dtype))
    engine = llama.open_engine(n_slots=n, max_queue=4 * n, prefix_reuse=False)
    engine.start()
    tok = llama.tokenizer
    greedy = SamplingParams(temperature=0)
    plain_ids = [tok.encode(prompts[i % len(prompts)], bos=True) for i in range(n)]
    json_ids = [tok.encode(JSON_PROMPTS[i % len(JSON_PROMPTS)] + f"(record {i}) ", bos=True) for i in range(n)]
    constraint = llama.grammar.json_schema(JSON_SCHEMA) if {"json", "json-free"} & set(variants) else None

    def jobs(variant):
        if variant in ("base", "loras"):
            return [Job(list(p), args.max_tokens, greedy, detokenize=False,
                        adapter=f"lora{i % args.loras}" if variant == "loras" else None)
                    for i, p in enumerate(plain_ids)]
        return [Job(list(p), args.max_tokens, greedy, detokenize=False,
                    stop_ids=tok.stop_ids if variant == "json" else frozenset(),
                    constraint=constraint if variant == "json" else None) for p in json_ids]

    print(f"in-process engine, model {args.model}, {n} requests at once, {args.max_tokens} greedy tokens each, "
          f"torch threads {torch.get_num_threads()}, {args.repeats} repeats, variants {variants}"
          + (f", {args.loras} random rank-8 LoRA adapters in {args.lora_dtype}" if "loras" in variants else ""))
    run_burst(engine, jobs(variants[0])[:2])  # warm-up: kernels, grammar tables
    results = {v: [] for v in variants}
    outputs = {}
    try:
        for r in range(args.repeats):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                tokens, cpu, wall, toks, ttft = run_burst(engine, jobs(v))
                first_cpu = statistics.median(c for c, _ in ttft)
                results[v].append((tokens, cpu, wall, first_cpu))
                if outputs.setdefault(v, toks) != toks:
                    print(f"  note: {v} gave other tokens than in its first run")
                print(f"  repeat {r} {v:9s} {tokens:5d} tokens  {tokens / cpu:7.1f} tok/CPU-s  "
                      f"{tokens / wall:7.1f} tok/s wall  first token p50 / max {1000 * first_cpu:.0f} / "
                      f"{1000 * max(c for c, _ in ttft):.0f} ms CPU, {1000 * statistics.median(w for _, w in ttft):.0f}"
                      f" / {1000 * max(w for _, w in ttft):.0f} ms wall", flush=True)
    finally:
        engine.close()
    print("\n| variant | tokens/run | tok per CPU-s (median) | vs baseline | tok/s wall (median) | vs baseline "
          "| first token p50, CPU ms (median) |")
    print("|---|---|---|---|---|---|---|")
    med = {v: (statistics.median(r[0] / r[1] for r in rs), statistics.median(r[0] / r[2] for r in rs),
               statistics.median(r[3] for r in rs)) for v, rs in results.items()}
    for v in variants:
        base = BASELINE[v] if BASELINE[v] in med else None
        ratio_cpu = f"{med[v][0] / med[base][0]:.1%}" if base else "-"
        ratio_wall = f"{med[v][1] / med[base][1]:.1%}" if base else "-"
        print(f"| {v} | {results[v][0][0]} | {med[v][0]:.1f} | {ratio_cpu} | {med[v][1]:.1f} | {ratio_wall} "
              f"| {1000 * med[v][2]:.0f} |")
    return 0
