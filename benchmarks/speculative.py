"""Speculative greedy decoding (llamaforge.generation.speculative) against plain greedy steps.

    python benchmarks/speculative.py [--model FILE.gguf] [--dtype float32] [--draft FILE.gguf|default] [--tokens 256] [--k 7]
                                     [--threads 1] [--repeats 3] [--only grounded|open] [--api] [--costs-only]
                                     [--kv-type float16|float32|bfloat16|q8_0]

For each prompt of benchmarks/spec_prompts.py (input-grounded: repeat / fix / edit / summarise / quote a given
text; open-ended: nothing to copy) it runs plain greedy decoding (one-token steps through the same `Steps`) and
speculative decoding with prompt lookup (and with a draft model when --draft is given), up to a stop token,
alternating them `--repeats` times, checks that the tokens are identical, and prints the median decode speed
(tokens after the prefill's one per second of decoding: the prefill is the same work in both), the speed-up,
acceptance and tokens per target call, then the geometric mean speed-up per kind. First it measures what a
verification of r rows costs against a one-token step (r = 1..16, at a 200-token context, alternated, median):
the cost curve every speed-up rests on (`--costs-only` stops there: with `--model` a 1B/3B shape file of
benchmarks/shapes.py, whose random weights make no text worth drafting, it still gives the curve). Each prompt
also prints two bounds replayed on the plain output at that curve: "best lengths" (this drafter's proposals,
each cut at exactly what the model accepts: the planner's ceiling) and "any match" (every round drafts the
longest run of the coming output that occurs anywhere earlier in the context: prompt lookup's ceiling).
The target's (and a draft model's) steps are those `Llama.generate(..., speculative=...)` runs: the fused step
over a KV cache of the Llama's `kv_type` (float16 for GGUF-quantized weights; `--kv-type` to choose another:
this file before 2026-12-01 19:00 measured float32 caches). Times are process CPU
seconds (`time.process_time`) with one thread (what the decode costs, undisturbed by other jobs waiting for
the cores on a shared machine), wall seconds otherwise; the planner measures rounds with the same clock.
`--api` also times `Llama.generate(..., temperature=0)` against `speculative="ngram"` end to end (prefill
included, through the engine for plain decoding). Not run by the tests.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spec_prompts  # noqa: E402


class Plain:
    """Drafts nothing: every round is a one-token step (plain greedy decoding)."""

    cheap = True
    last_key = None

    def propose(self, context, k):
        return []


ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16)


def cost_curve(steps, clock, repeats: int) -> dict[int, float]:
    """Seconds of a verification of r rows (ROWS) at positions 200.., the row counts alternated, medians."""
    ctx = list(range(100, 300))
    steps.prefill(ctx)
    times: dict[int, list[float]] = {r: [] for r in ROWS}
    for _ in range(repeats + 1):  # the first round warms caches and is not kept
        for r in ROWS:
            t0 = clock()
            steps.verify(ctx[:r], len(ctx))
            times[r].append(clock() - t0)
    return {r: statistics.median(t[1:]) for r, t in times.items()}


def replay_bound(prompt, out, ratio: dict[int, float], k: int, drafter=None) -> float:
    """Speed-up of replaying `out` at the cost curve `ratio` (rows -> cost of a one-token step) when every round
    drafts exactly the tokens the model then accepts: of `drafter`'s proposal (up to k), or, with no drafter,
    the longest run of the coming output found anywhere earlier in the context (up to k)."""
    rows = sorted(ratio)
    cost = lambda r: ratio[min((x for x in rows if x >= r), default=rows[-1])]  # noqa: E731
    path, i, spent = list(prompt) + list(out), 0, 0.0
    while i < len(out) - 1:
        ctx, future = path[: len(prompt) + i + 1], out[i + 1 : i + 1 + min(k, len(out) - 2 - i)]
        if drafter is not None:
            proposal = drafter.propose(ctx, len(future))
            agree = [a == b for a, b in zip(proposal, future)]
            accepted = agree.index(False) if False in agree else len(agree)
        else:
            accepted = max((next((j for j in range(len(future)) if s + j >= len(ctx) or path[s + j] != future[j]),
                                 len(future)) for s in range(len(ctx))), default=0)
        spent += cost(accepted + 1)
        i += accepted + 1
    return (len(out) - 1) / spent if spent else 1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF file (default: the default model)")
    p.add_argument("--dtype", help="the target's dtype (e.g. float32: the default model dequantized, a slower target "
                   "of the same tokenizer for the default model to draft for)")
    p.add_argument("--draft", help="a draft model's GGUF (same tokenizer), or 'default' for the default model")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--k", type=int, default=7, help="most tokens drafted per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=["grounded", "open"])
    p.add_argument("--api", action="store_true", help="also time Llama.generate end to end")
    p.add_argument("--verbose", action="store_true", help="print the planner's measured round costs")
    p.add_argument("--costs-only", action="store_true", help="only measure the verification cost curve")
    p.add_argument("--kv-type", help="the KV cache's element type (default: the Llama's, as the API runs it)")
    a = p.parse_args()

    import torch

    from llamaforge import Llama
    from llamaforge.api.dispatch import own_decode_step
    from llamaforge.default_model import default_model_path
    from llamaforge.generation.speculative import (
        DraftPlanner, ModelDrafter, NgramDrafter, SpecStats, check_same_vocabulary, model_steps, speculative_greedy,
    )

    torch.set_num_threads(a.threads)
    clock = time.process_time if a.threads == 1 else time.perf_counter
    seq = 1024
    llm = Llama.build(a.model or default_model_path(), max_seq_len=seq, max_batch_size=1, device="cpu",
                      dtype=a.dtype, progress=False, kv_type=a.kv_type)
    draft = None
    if a.draft:
        draft = Llama.build(default_model_path() if a.draft == "default" else a.draft, max_seq_len=seq,
                            max_batch_size=1, device="cpu", progress=False, kv_type=a.kv_type)
    if draft is not None:
        check_same_vocabulary(llm.tokenizer, draft.tokenizer)
    tok = llm.tokenizer
    steps = model_steps(llm.model, seq, own_decode_step(llm))
    print(f"KV cache {llm.kv_type}" + (f", draft model's {draft.kv_type}" if draft is not None else ""))
    curve = cost_curve(steps, clock, max(a.repeats, 3) * 3)
    print("verification cost, rows: ms (x a one-token step): " + ", ".join(
        f"{r}: {1000 * c:.2f} ({c / curve[1]:.2f}x)" for r, c in curve.items()))
    if a.costs_only:
        return
    ratio = {r: c / curve[1] for r, c in curve.items()}
    kinds = {"grounded": spec_prompts.GROUNDED, "open": spec_prompts.OPEN}
    if a.only:
        kinds = {a.only: kinds[a.only]}
    print(f"model {a.model or 'default'} ({a.dtype or 'as stored'}), draft {a.draft}, up to {a.tokens} new tokens, k={a.k}, {a.threads} thread(s), "
          f"{'CPU' if a.threads == 1 else 'wall'} seconds, median of {a.repeats}")
    speedups: dict[tuple[str, str], list[float]] = {}
    for kind, prompts in kinds.items():
        for name, text in prompts.items():
            prompt = tok.encode(spec_prompts.chat(text), allow_special=True)
            drafters = {"plain": Plain, "prompt lookup": NgramDrafter}
            if draft is not None:
                drafters["draft model"] = lambda: ModelDrafter(model_steps(draft.model, seq, own_decode_step(draft)))
            runs: dict[str, list] = {label: [] for label in drafters}
            for _ in range(a.repeats + 1):  # the first round warms caches and is not kept
                for label, make in drafters.items():
                    st, plan = SpecStats(), DraftPlanner(k=a.k, clock=clock)
                    out = speculative_greedy(steps, prompt, a.tokens, make(), stats=st, stop_ids=tok.stop_ids,
                                             planner=plan)
                    runs[label].append((out, st, plan))
            base_out = runs["plain"][0][0]
            rate = {label: statistics.median((st.tokens - 1) / (st.seconds - st.prefill_seconds) for _, st, _ in r[1:])
                    for label, r in runs.items()}
            print(f"\n{kind} / {name}: prompt {len(prompt)} tokens, output {len(base_out)} tokens; bounds at the "
                  f"cost curve: best lengths {replay_bound(prompt, base_out, ratio, a.k, NgramDrafter()):.2f}x, "
                  f"any match {replay_bound(prompt, base_out, ratio, a.k):.2f}x")
            for label, r in runs.items():
                out, st, plan = r[-1]
                x = rate[label] / rate["plain"]
                if label != "plain":
                    speedups.setdefault((kind, label), []).append(x)
                same = all(o == base_out for o, _, _ in r)
                print(f"  {label:14} {rate[label]:6.1f} tok/s ({x:4.2f}x); identical {same}; acceptance "
                      f"{100 * st.acceptance:4.1f}% ({st.accepted}/{st.drafted}), {st.tokens_per_call:.2f} tokens "
                      f"per target call, {st.plain_steps} plain steps")
                if a.verbose and label != "plain" and 0 in plan.cost:
                    print("    round cost / plain step by draft length: " + ", ".join(
                        f"{d}: {c / plan.cost[0]:.2f}" for d, c in sorted(plan.cost.items())))
            if a.api:
                times = {"plain": [], "ngram": []}
                for _ in range(a.repeats):
                    for label in times:
                        c0 = clock()
                        rows, _ = llm.generate([prompt], max_gen_len=a.tokens, temperature=0,
                                               speculative=None if label == "plain" else "ngram")
                        times[label].append(clock() - c0)
                t_plain, t_spec = statistics.median(times["plain"]), statistics.median(times["ngram"])
                print(f"  Llama.generate end to end: plain {t_plain:.3f} s, ngram {t_spec:.3f} s "
                      f"({t_plain / t_spec:.2f}x)")
    print()
    for (kind, label), xs in speedups.items():
        geo = math.exp(sum(math.log(x) for x in xs) / len(xs))
        print(f"{kind:9} {label:14} geometric mean {geo:.2f}x, min {min(xs):.2f}x, max {max(xs):.2f}x")


if __name__ == "__main__":
    main()
