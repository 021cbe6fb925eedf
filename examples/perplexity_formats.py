"""Perplexity of the default model (SmolLM2-135M-Instruct) at each weight format, on a fixed text.

The same text, tokenizer, window and stride for every row, so the numbers compare the formats only:

- `q4_1 file`: the shipped GGUF, loaded by `Llama.build` as it loads it by default;
- `q4_1 -> f32`: its weights dequantized to float32 (`dtype="float32"`);
- `bf16`: the same weights in bfloat16;
- `f16 gguf`, `q8_0 gguf`: the dequantized weights written back with `checkpoints.save_gguf` in F16
  and Q8_0, then loaded again.

The shipped weights are already 4-bit, so every row is at most as good as Q4_1; the rows show what
each further conversion costs. Default text: the first 4,096 tokens of Macbeth (public domain, from
examples/get_shakespeare.py; any UTF-8 file can be given), window 512, stride 256.

    python examples/get_shakespeare.py data/shakespeare
    python examples/perplexity_formats.py data/shakespeare/heldout.txt
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", nargs="?", default="data/shakespeare/heldout.txt")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    args = parser.parse_args()

    from llamaforge import checkpoints
    from llamaforge.api import Llama
    from llamaforge.default_model import default_model_path
    from llamaforge.training.eval import perplexity

    source = default_model_path()
    text = Path(args.text).read_text(encoding="utf-8")
    rows = []

    def measure(name: str, path: Path, dtype) -> None:
        llama = Llama.build(str(path), max_seq_len=args.window, max_batch_size=1, device="cpu", dtype=dtype,
                            progress=False)
        tok = llama.tokenizer
        ids = tok.encode(text, bos=tok.add_bos and tok.bos_id is not None)[: args.tokens]
        t0 = time.perf_counter()
        r = perplexity(llama.model, ids, window=args.window, stride=args.stride)
        rows.append({"format": name, "perplexity": round(r.perplexity, 3), "nll": round(r.nll, 4),
                     "tokens": r.n_tokens, "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{name:12s} perplexity {r.perplexity:8.3f}  (NLL {r.nll:.4f}, {r.n_tokens} tokens, "
              f"{time.perf_counter() - t0:.0f}s)", flush=True)

    measure("q4_1 file", source, None)
    measure("q4_1 -> f32", source, "float32")
    measure("bf16", source, "bfloat16")
    ckpt = checkpoints.load(source, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("f16", "q8_0"):
            out = Path(tmp) / f"model-{kind}.gguf"
            checkpoints.save_gguf(ckpt.args, ckpt.state_dict, out, tokenizer_metadata=ckpt.gguf_metadata, dtype=kind)
            measure(f"{kind} gguf", out, "float32")
    print(json.dumps({"text": args.text, "window": args.window, "stride": args.stride, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
