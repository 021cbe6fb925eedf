"""`llamaforge convert`: turn any checkpoint llamaforge reads (Meta, Hugging Face, GGUF) into Meta or HF format.

GGUF output is also possible, with the tokenizer and chat template embedded: f32, f16, bf16, or as
llama-quantize writes them q8_0, q4_0, q4_k_m, q6_k (`--to gguf --dtype q4_k_m`). Quantized GGUF weights are dequantized
on the way out, so a Meta or HF copy of a Q4 file holds the Q4 values exactly, in the chosen dtype.
The tokenizer travels with the weights: its file is copied, or (from a GGUF vocabulary) written as
tokenizer.json + tokenizer_config.json.
"""

from __future__ import annotations

import argparse

FORMATS = ("meta", "hf", "gguf")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to Meta, Hugging Face or GGUF format", description=__doc__)
    p.add_argument("source", help="checkpoint to read (Meta folder, HF folder or .gguf file)")
    p.add_argument("output", help="folder to write (a .gguf file for --to gguf)")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument("--dtype", default=None,
                   help="weights dtype: float32/bfloat16/float16 (meta, hf); f32/f16/bf16/q8_0/q4_0/q4_k_m/q6_k (gguf, "
                        "default f32); default keeps the source's")
    p.add_argument("--tokenizer_path", "--tokenizer-path", dest="tokenizer_path", default=None)
    p.add_argument("--shards", type=int, default=1, help="model-parallel shards for Meta output (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from llamaforge.convert import convert

    out = convert(args.source, args.output, to=args.to, dtype=args.dtype, tokenizer_path=args.tokenizer_path,
                  shards=args.shards, overwrite=args.overwrite)
    print(f"wrote {args.to} checkpoint to {out}")
    return 0
