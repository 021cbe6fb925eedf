"""`llamaforge generate`: complete one or more prompts (Meta's example_text_completion, generalised)."""

from __future__ import annotations

import argparse
import sys

from llamaforge.cli.common import add_model_flags, add_sampling_flags, build_from_flags


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete text prompts", description=__doc__)
    add_model_flags(p)
    add_sampling_flags(p, max_gen_len=64)
    p.add_argument("-p", "--prompt", action="append", default=[], help="a prompt (repeat for a batch; '-' reads stdin)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    p.add_argument("--logprobs", action="store_true", help="print each token with its log-probability")
    p.add_argument("--echo", action="store_true", help="include the prompt in the output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    prompts = [sys.stdin.read() if p == "-" else p for p in args.prompt]
    if not prompts:
        print("error: give at least one --prompt", file=sys.stderr)
        return 2
    generator = build_from_flags(args)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.stream:
        if len(prompts) != 1:
            print("error: --stream takes exactly one --prompt", file=sys.stderr)
            return 2
        print(prompts[0], end="", flush=True)
        for piece in generator.stream_text_completion(prompts[0], args.max_gen_len, **sampling):
            print(piece, end="", flush=True)
        print()
        return 0
    results = generator.text_completion(
        prompts, max_gen_len=args.max_gen_len, logprobs=args.logprobs, echo=args.echo, **sampling
    )
    for prompt, result in zip(prompts, results):
        if not args.echo:
            print(prompt, end="")
        print(result["generation"])
        if args.logprobs:
            for token, lp in zip(result["tokens"], result["logprobs"]):
                print(f"  {token!r}\t{lp:.4f}")
        print("\n==================================\n")
    return 0
