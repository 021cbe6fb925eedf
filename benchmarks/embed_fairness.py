"""Short generations while a large embedding request runs: the engine interleaves them (issue 17).

    python benchmarks/embed_fairness.py [--inputs 400] [--tokens 120] [--gen 16]

Builds the default model (a `Llama`, as the server serves it), times a short greedy completion alone,
then again while one embedding request of `--inputs` inputs of `--tokens` tokens runs on the same
engine, and prints both latencies, their ratio and how much of the embedding work was done when the
short answer arrived. While generation runs, embedding work gets about one decode step's time per
engine step (in chunks of 32 tokens), so the short request should take at most about 2x its solo time. Not run by the tests; the numbers depend on the machine (RESULTS.md says which).
"""

from __future__ import annotations

import argparse
import statistics
import time

from llamaforge import Llama


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=400)
    p.add_argument("--tokens", type=int, default=120)
    p.add_argument("--gen", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    llama = Llama.build(max_seq_len=512, max_batch_size=4, progress=False)
    prompt = llama.tokenizer.encode("The capital of France is", bos=llama.tokenizer.add_bos)

    def short() -> float:
        t = time.perf_counter()
        llama.generate([prompt], args.gen, temperature=0, stop_ids=())
        return time.perf_counter() - t

    short()  # warm-up
    solo = statistics.median(short() for _ in range(args.runs))
    big = [[(7 * i + j) % 1000 + 10 for j in range(args.tokens)] for i in range(args.inputs)]
    engine = llama.engine
    done = []  # tokens embedded
    hidden_sum = engine.runner.hidden_sum
    engine.runner.hidden_sum = lambda cache, ids, start: (done.append(len(ids)), hidden_sum(cache, ids, start))[1]
    busy, progress = [], []
    for _ in range(args.runs):
        done.clear()
        fut = engine.embed(big)
        time.sleep(0.05)  # the embedding work is under way
        busy.append(short())
        progress.append(sum(done) / args.tokens)
        fut.cancel()
        time.sleep(0.2)
    during = statistics.median(busy)
    print(f"short completion ({args.gen} tokens): alone {solo * 1000:.0f} ms, during a {args.inputs} x "
          f"{args.tokens}-token embedding request {during * 1000:.0f} ms ({during / solo:.2f}x); embedding inputs "
          f"done by then: {statistics.median(progress):.1f} of {args.inputs}")


if __name__ == "__main__":
    main()
