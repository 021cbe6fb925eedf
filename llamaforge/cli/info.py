"""`llamaforge info`: what a checkpoint is (format, shapes, parameters, dtypes, tokenizer, chat format)."""

from __future__ import annotations

import argparse
import json
from collections import Counter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a checkpoint", description=__doc__)
    p.add_argument("model", nargs="?", default=None, help="checkpoint path or model reference (default: the default model)")
    p.add_argument("--tokenizer_path", "--tokenizer-path", dest="tokenizer_path", default=None)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def describe(model=None, tokenizer_path=None) -> dict:
    """A plain dict describing a checkpoint and its tokenizer; loads no weights into a model."""
    from llamaforge import checkpoints
    from llamaforge.chat import chat_format_for
    from llamaforge.hub import resolve_model
    from llamaforge.tokenizer import Tokenizer

    path = resolve_model(model)
    ckpt = checkpoints.load(path, progress=False, keep_quantized=True)
    dtypes = Counter(getattr(t, "qtype", None) or str(t.dtype).replace("torch.", "") for t in ckpt.state_dict.values())
    info = {
        "path": str(path),
        "format": ckpt.format,
        "args": ckpt.args.to_dict(),
        "parameters": ckpt.args.n_params,
        "tensor_types": dict(dtypes),
    }
    try:
        tok = Tokenizer.from_source(ckpt.tokenizer_source, tokenizer_path, hint="--tokenizer_path")
        info["tokenizer"] = {"kind": tok.kind, "n_words": tok.n_words, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                             "stop_ids": sorted(tok.stop_ids), "add_bos": tok.add_bos}
        info["chat_format"] = chat_format_for(tok).name
    except Exception as exc:  # a checkpoint without a tokenizer is still worth describing
        info["tokenizer"] = f"unavailable: {exc}"
    return info


def run(args: argparse.Namespace) -> int:
    info = describe(args.model, args.tokenizer_path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    a = info["args"]
    print(f"path:        {info['path']}")
    print(f"format:      {info['format']}")
    print(f"parameters:  {info['parameters'] / 1e6:.1f}M")
    print(f"shape:       dim {a['dim']}, {a['n_layers']} layers, {a['n_heads']} heads ({a['n_kv_heads']} kv, "
          f"head_dim {a['head_dim']}), ffn {a['hidden_dim']}, vocab {a['vocab_size']}")
    print(f"context:     {a['max_seq_len']} positions, rope_theta {a['rope_theta']}"
          + (f", scaling {a['rope_scaling']}" if a["rope_scaling"] else ""))
    print(f"tied output: {a['tie_embeddings']}")
    print(f"tensors:     {', '.join(f'{k} x{v}' for k, v in info['tensor_types'].items())}")
    print(f"tokenizer:   {info['tokenizer']}")
    print(f"chat format: {info.get('chat_format', '-')}")
    return 0
