"""What each KV cache element type costs in accuracy: perplexity and greedy agreement against a float32 cache.

Perplexity (`llamaforge.training.eval.perplexity(..., kv_type=)`: each window's keys and values stored in a cache
of that type and read back by attention, as in generation) on a real text, by default this repository's
README.md and docs/architecture.md; and greedy generation (`Llama.build(kv_type=)`, the fused decode step and
the engine as every call runs them) of a set of prompts, compared with the float32 cache's tokens: prompts whose
whole answer is identical, and the share of tokens before the first difference. Default model: the default
GGUF (SmolLM2-135M-Instruct, quantized weights); `--dtype float32` dequantizes it, which isolates what the
cache's precision costs from the int8 rounding of activations in the quantized kernels: that rounding turns any
change of the last bits of a key into a different int8 rounding downstream, so on quantized weights the figures
scatter around the float32 cache's. `--noise-floor` adds rows with a float32 cache whose stored keys and values are
scaled by 1 +- 2^-22 (a couple of ulps): the scatter that alone causes. Not run by the tests.

    python benchmarks/kv_accuracy.py
    python benchmarks/kv_accuracy.py --model x.gguf --types float32,float16,q8_0 --tokens 8192
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The history of the printing press begins",
    "Write a short poem about the sea.",
    "Explain how a hash table works.",
    "def fibonacci(n):",
    "The three largest cities in Europe are",
    "Once upon a time, in a village at the foot of the mountains,",
    "Summarise the causes of the French Revolution in a paragraph.",
    "List five uses of copper.",
    "A good night's sleep matters because",
    "Translate to French: The weather is nice today and we will go for a walk.",
    "Q: What is the boiling point of water at sea level?\nA:",
    "The key idea of the theory of evolution is",
]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    p.add_argument("--types", default="float32,float16,bfloat16,q8_0", help="KV types; the first is the reference")
    p.add_argument("--text", type=Path, nargs="*", default=[ROOT / "README.md", ROOT / "docs" / "architecture.md"])
    p.add_argument("--tokens", type=int, default=6144, help="score the first N tokens of the text")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--gen-len", type=int, default=96, help="greedy tokens per prompt")
    p.add_argument("--dtype", default=None, help="Llama.build's dtype (float32: dequantized weights)")
    p.add_argument("--noise-floor", action="store_true", help="also a float32 cache moved by a couple of ulps")
    a = p.parse_args(argv)
    from llamaforge import Llama
    from llamaforge.model import kv_types
    from llamaforge.training.eval import perplexity

    types = [kv_types.check_kv_type(t, name="--types") for t in a.types.split(",")]
    runs = [(t, t, 0.0) for t in types]  # (label, kv type, relative change of the stored rows)
    if a.noise_floor:
        runs += [(f"float32 x (1 {'+' if e > 0 else '-'} 2^-22)", "float32", e) for e in (2.0**-22, -(2.0**-22))]
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in a.text)
    rows, answers = [], {}
    encode = kv_types.encode
    for label, t, eps in runs:
        # the noise floor: every stored row scaled by 1 + eps before it is stored (KVCache.update and the fused
        # step's input alike would need a patch; the fused step stores in C++, so those rows run unfused)
        kv_types.encode = encode if not eps else (lambda x, kv, e=eps: encode(x * (1 + e), kv))
        llm = Llama.build(a.model, max_seq_len=2048, max_batch_size=len(PROMPTS), device="cpu", progress=False,
                          kv_type=t, dtype=a.dtype)
        if eps:
            llm.decode_step.fused = None  # the modules, whose store goes through the scaled encode
        tok = llm.tokenizer
        ids = tok.encode(text, bos=tok.add_bos and tok.bos_id is not None)[: a.tokens]
        ppl = perplexity(llm.model, ids, window=a.window, kv_type=t)
        prompts = [tok.encode(x, bos=tok.add_bos and tok.bos_id is not None) for x in PROMPTS]
        out, _ = llm.generate(prompts, max_gen_len=a.gen_len, temperature=0)
        answers[label] = out
        rows.append((label, ppl))
        print(f"{label}: perplexity {ppl.perplexity:.4f} over {ppl.n_tokens} tokens", file=sys.stderr, flush=True)
    kv_types.encode = encode
    ref_t, ref_ppl = rows[0]
    print(f"## KV cache types, accuracy: {a.model or 'the default model'}, dtype {a.dtype}; text {', '.join(f.name for f in a.text)} "
          f"({rows[0][1].n_tokens} tokens scored, window {a.window}, stride {rows[0][1].stride}); "
          f"{len(PROMPTS)} prompts x {a.gen_len} greedy tokens\n")
    print(f"| KV type | perplexity | delta vs {ref_t} | prompts with identical answers | tokens before the first difference |")
    print("|---|---|---|---|---|")
    for t, ppl in rows:
        same, agree, total = 0, 0, 0
        for ours, ref in zip(answers[t], answers[ref_t]):
            n = next((i for i, (x, y) in enumerate(zip(ours, ref)) if x != y), min(len(ours), len(ref)))
            same += ours == ref
            agree += n
            total += len(ref)
        delta = ppl.perplexity - ref_ppl.perplexity
        print(f"| {t} | {ppl.perplexity:.4f} | {delta:+.4f} ({100 * delta / ref_ppl.perplexity:+.2f}%) | "
              f"{same}/{len(PROMPTS)} | {100 * agree / max(1, total):.1f}% |")


if __name__ == "__main__":
    main(sys.argv[1:])
