"""Flags shared by the commands that load a model, including the flags of Meta's example scripts."""

from __future__ import annotations

import argparse
import logging
from typing import Any


def add_model_flags(parser: argparse.ArgumentParser, *, max_seq_len: Any = None, max_batch_size: int = 4) -> None:
    """MODEL (positional) or Meta's --ckpt_dir, plus --tokenizer_path, devices and context size."""
    parser.add_argument("model", nargs="?", default=None,
                        help="checkpoint: Meta folder, Hugging Face folder, .gguf file, or a model reference "
                             "org/name[:QUANT][@REVISION] (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--ckpt_dir", "--ckpt-dir", dest="ckpt_dir", default=None, help="same as MODEL (Meta's flag)")
    parser.add_argument("--tokenizer_path", "--tokenizer-path", dest="tokenizer_path", default=None,
                        help="tokenizer.model / tokenizer.json, when the checkpoint carries none")
    parser.add_argument("--max_seq_len", "--max-seq-len", dest="max_seq_len", type=int, default=max_seq_len,
                        help="longest prompt + answer (default: the model's context length)")
    parser.add_argument("--max_batch_size", "--max-batch-size", dest="max_batch_size", type=int,
                        default=max_batch_size, help="most prompts per batch")
    parser.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: by device)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (Meta's build seeds with 1)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and where")


def add_sampling_flags(parser: argparse.ArgumentParser, *, max_gen_len: Any = None) -> None:
    parser.add_argument("--temperature", type=float, default=0.6, help="0 for greedy (default 0.6)")
    parser.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=0.9, help="nucleus threshold (0.9)")
    parser.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=None, help="keep the k best tokens")
    parser.add_argument("--max_gen_len", "--max-gen-len", "-n", dest="max_gen_len", type=int, default=max_gen_len,
                        help="most tokens to generate")


def build_from_flags(args: argparse.Namespace):
    """Build a Llama from parsed flags (MODEL and --ckpt_dir are the same thing)."""
    from llamaforge.api import Llama

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.model and args.ckpt_dir and args.model != args.ckpt_dir:
        raise SystemExit(f"error: MODEL ({args.model}) and --ckpt_dir ({args.ckpt_dir}) disagree; give one")
    return Llama.build(
        ckpt_dir=args.model or args.ckpt_dir,
        tokenizer_path=args.tokenizer_path,
        max_seq_len=args.max_seq_len,
        max_batch_size=args.max_batch_size,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
    )
