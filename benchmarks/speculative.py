"""Speculative greedy decoding (llamaforge.generation.speculative) against plain greedy steps.

    python benchmarks/speculative.py [--model FILE.gguf] [--draft FILE.gguf] [--tokens 128] [--k 4] [--threads 1]

On an input-grounded prompt (repeat / lightly edit a given text: the answer copies from the prompt) and an
open-ended one, it runs plain greedy decoding (one-token steps) and speculative decoding with prompt lookup
(and with a draft model when --draft is given), up to a stop token, checks that the tokens are identical, and
prints acceptance,
tokens per verify round and the speed-up. Times are process CPU seconds (`time.process_time`) as well as wall
seconds: with one thread, CPU time is what the decode costs, undisturbed by other jobs waiting for the cores
(the shared machines here). Not run by the tests.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg of Mainz "
    "combined a screw press, oil-based ink and movable type cast from a lead alloy. Before him, books in "
    "Europe were copied by hand, mostly in monasteries, and a single Bible could take a scribe more than a "
    "year. Within fifty years of the first printed Bible, presses were working in more than two hundred "
    "cities, and millions of volumes had been printed."
)
PROMPTS = {
    "input-grounded (repeat the text)": "<|im_start|>user\nRepeat this text exactly, word for word:\n\n" + TEXT
    + "<|im_end|>\n<|im_start|>assistant\n",
    "open-ended": "<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF file (default: the default model)")
    p.add_argument("--draft", help="a draft model's GGUF (same vocabulary)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    import torch

    from llamaforge import Llama
    from llamaforge.default_model import default_model_path
    from llamaforge.generation.speculative import (
        ModelDrafter, NgramDrafter, SpecStats, Speedometer, model_steps, speculative_greedy,
    )

    torch.set_num_threads(a.threads)
    # what the Speedometer compares: CPU time with one thread (robust to other jobs), else wall time
    clock = time.process_time if a.threads == 1 else time.perf_counter
    llm = Llama.build(a.model or default_model_path(), max_seq_len=1024, max_batch_size=1, device="cpu",
                      progress=False)
    draft = Llama.build(a.draft, max_seq_len=1024, max_batch_size=1, device="cpu", progress=False) if a.draft else None
    tok = llm.tokenizer
    print(f"model {a.model or 'default'}, {a.tokens} new tokens, k={a.k}, {a.threads} thread(s)")
    for name, text in PROMPTS.items():
        prompt = tok.encode(text, allow_special=True)
        steps = model_steps(llm.model, 1024)
        never = Speedometer(clock=lambda: 0.0)  # plain: drafting never asked for (see below)
        runs = {}

        class Nothing:
            def propose(self, context, k):
                return []

        drafters = {"plain": Nothing(), "prompt lookup": NgramDrafter()}
        if draft is not None:
            drafters["draft model"] = ModelDrafter(model_steps(draft.model, 1024))
        for label, drafter in drafters.items():
            for attempt in range(2):  # the second run is the one kept (the first warms caches)
                st = SpecStats()
                c0, w0 = time.process_time(), time.perf_counter()
                out = speculative_greedy(steps, prompt, a.tokens, drafter, k=a.k, stats=st, stop_ids=tok.stop_ids,
                                         speedometer=never if label == "plain" else Speedometer(clock=clock))
                runs[label] = (out, time.process_time() - c0, time.perf_counter() - w0, st)
        base = runs["plain"]
        print(f"\n{name}: prompt {len(prompt)} tokens")
        for label, (out, cpu, wall, st) in runs.items():
            rounds = st.rounds + st.plain_steps
            print(f"  {label:14} {len(out) / cpu:6.1f} tok/s CPU ({base[1] / cpu:4.2f}x), {len(out) / wall:6.1f} wall "
                  f"({base[2] / wall:4.2f}x); identical {out == base[0]}; acceptance {100 * st.acceptance:4.1f}% "
                  f"({st.accepted}/{st.drafted}), {len(out) / max(1, rounds):.2f} tokens per target call")


if __name__ == "__main__":
    main()
