"""`llamaforge quantize IN.gguf OUT.gguf TYPE`: requantize a GGUF file as llama.cpp's llama-quantize does.

TYPE is q4_k_m, q4_0, q8_0, q6_k (llama.cpp's mix of tensor types for it, bit-identical quantization),
or f16 / bf16 / f32. The metadata, tokenizer and chat template are kept; the write is atomic. A file
that is already quantized needs --allow-requantize, as with llama-quantize.
"""

from __future__ import annotations

import argparse

TYPES = ("q4_k_m", "q4_0", "q8_0", "q6_k", "f16", "bf16", "f32")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="requantize a GGUF file (as llama-quantize)", description=__doc__)
    p.add_argument("input", help="GGUF file to read")
    p.add_argument("output", help="GGUF file to write")
    p.add_argument("type", type=str.lower, choices=TYPES, metavar="TYPE", help=f"one of {', '.join(TYPES)}")
    p.add_argument("--allow-requantize", action="store_true",
                   help="requantize tensors that are already quantized (as llama-quantize's flag)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from llamaforge.checkpoints import quantize_gguf

    out = quantize_gguf(args.input, args.output, args.type, allow_requantize=args.allow_requantize,
                        overwrite=args.overwrite)
    print(f"wrote {args.type} GGUF to {out}")
    return 0
