"""`llamaforge eval`: perplexity of any model `Llama.build` loads on a text file.

The text is encoded as one sequence (with BOS when the model uses one) and scored with a sliding
window: `--window` tokens per forward pass, moved `--stride` tokens at a time (default window // 2),
so every token but the first is scored once, with at least window - stride tokens of context after the
first window. Keys and values pass through the KV cache's element type (`--kv-type`) as in generation.
Lower is better; compare numbers only for the same text, tokenizer, window and stride.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llamaforge.cli.common import UsageError, add_model_flags, build_from_flags


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on a text file (sliding window)", description=__doc__)
    add_model_flags(p)
    p.add_argument("--data", "-d", required=True, help="a UTF-8 text file")
    p.add_argument("--window", type=int, default=None, help="tokens per forward pass (default min(context, 1024))")
    p.add_argument("--stride", type=int, default=None, help="tokens the window moves (default window // 2)")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.data)
    if not path.is_file():
        raise UsageError(f"--data {path} is not a file" + ("" if path.exists() else " (it does not exist)"))
    from llamaforge.training.eval import perplexity

    llama = build_from_flags(args)
    tok = llama.tokenizer
    ids = tok.encode(path.read_text(encoding="utf-8", errors="replace"), bos=tok.add_bos and tok.bos_id is not None)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    window = args.window or min(llama.max_seq_len, 1024, max(2, len(ids)))
    result = perplexity(llama.model, ids, window=window, stride=args.stride, batch_size=args.batch_size,
                        device=llama.device, progress=not args.json, kv_type=llama.kv_type)
    if args.json:
        print(json.dumps({"model": str(llama.source), "data": str(path), "perplexity": result.perplexity,
                          "nll": result.nll, "tokens": result.n_tokens, "window": result.window,
                          "stride": result.stride, "kv_type": llama.kv_type}))
    else:
        print(f"perplexity {result.perplexity:.4f}  (mean NLL {result.nll:.4f} nats/token, {result.n_tokens} tokens "
              f"scored, window {result.window}, stride {result.stride}, KV cache {llama.kv_type}; model {llama.source}, text {path})")
    return 0
