"""`llamaforge info`: what a checkpoint is (format, shapes, parameters, dtypes, tokenizer, chat format)."""

from __future__ import annotations

import argparse
from collections import Counter

from llamaforge.cli.common import add_json_flag, check_model_path, flag, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a checkpoint", description=__doc__)
    p.add_argument("model", nargs="?", default=None, help="checkpoint path or model reference (default: the default model)")
    p.add_argument(*flag("tokenizer_path"), dest="tokenizer_path", default=None,
                   help="tokenizer.model / tokenizer.json, when the checkpoint carries none")
    add_json_flag(p)
    p.set_defaults(run=run)


def describe(model=None, tokenizer_path=None) -> dict:
    """A plain dict describing a checkpoint and its tokenizer; loads no weights into a model."""
    import torch

    from llamaforge import checkpoints, runtime
    from llamaforge.errors import ConfigError
    from llamaforge.chat import chat_format_for
    from llamaforge.hub import resolve_model
    from llamaforge.model import kv_types
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
    args = ckpt.args
    gguf_weights = runtime.holds_gguf_weights(ckpt.state_dict)
    # What a CPU build picks without --kv-type, and what one position of one sequence takes in each type.
    per_position = {}
    for t in kv_types.KV_TYPES:
        try:
            per_position[t] = 2 * args.n_layers * args.n_kv_heads * kv_types.row_bytes(t, args.head_dim)
        except ConfigError:  # q8_0 with a head_dim that is no multiple of 32
            pass
    info["kv_cache"] = {
        "default_cpu": kv_types.choose_kv_type(None, model_dtype=torch.float32, gguf_weights=gguf_weights),
        "bytes_per_position": per_position,
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
    check_model_path(args.model)
    check_model_path(args.tokenizer_path, "--tokenizer-path")
    info = describe(args.model, args.tokenizer_path)
    if args.json:
        print_json(info)
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
    kv = info["kv_cache"]
    sizes = ", ".join(f"{t} {n / 1000:.1f} KB" for t, n in kv["bytes_per_position"].items())
    print(f"kv cache:    {kv['default_cpu']} by default on the CPU (--kv-type); per position {sizes}")
    return 0
