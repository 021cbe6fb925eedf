"""`llamaforge generate`: complete one or more prompts (Meta's example_text_completion, generalised).

On a terminal one prompt streams as it is generated; a batch, or output into a pipe, is printed when done.
For scripts: `--completion-only` prints just the generated text, `--json` one JSON document.
"""

from __future__ import annotations

import argparse
import sys

from llamaforge.cli.common import (
    UsageError, add_json_flag, add_model_flags, add_sampling_flags, build_from_flags, print_json,
)

SEPARATOR = "\n==================================\n"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete text prompts", description=__doc__)
    add_model_flags(p)
    add_sampling_flags(p, max_gen_len=64)
    p.add_argument("-p", "--prompt", action="append", default=[],
                   help="a prompt (repeat for a batch; '-' reads stdin)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print text as it is generated (default: on a terminal with one prompt)")
    p.add_argument(*("--completion-only", "--completion_only"), dest="completion_only", action="store_true",
                   help="print only the generated text: no prompt, no separator")
    p.add_argument("--logprobs", action="store_true", help="print each token with its log-probability")
    p.add_argument("--echo", action="store_true", help="include the prompt in the generation (and its logprobs)")
    add_json_flag(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    prompts = [sys.stdin.read() if p == "-" else p for p in args.prompt]
    if not prompts:
        raise UsageError("give at least one prompt with -p/--prompt ('-' reads stdin)")
    if args.stream and len(prompts) != 1:
        raise UsageError(f"--stream takes exactly one --prompt, got {len(prompts)}")
    if args.stream and (args.json or args.logprobs):
        raise UsageError("--stream cannot be combined with --json or --logprobs")
    stream = args.stream if args.stream is not None else (
        len(prompts) == 1 and sys.stdout.isatty() and not (args.json or args.logprobs))
    generator = build_from_flags(args)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if stream:
        if not args.completion_only:
            print(prompts[0], end="", flush=True)
        for piece in generator.stream_text_completion(prompts[0], args.max_gen_len, **sampling):
            print(piece, end="", flush=True)
        print()
        return 0
    results = generator.text_completion(
        prompts, max_gen_len=args.max_gen_len, logprobs=args.logprobs, echo=args.echo, **sampling
    )
    if args.json:
        print_json([{"prompt": prompt, **result} for prompt, result in zip(prompts, results)])
        return 0
    for prompt, result in zip(prompts, results):
        if args.completion_only:
            print(result["generation"])
            continue
        if not args.echo:
            print(prompt, end="")
        print(result["generation"])
        if args.logprobs:
            for token, lp in zip(result["tokens"], result["logprobs"]):
                print(f"  {token!r}\t{lp:.4f}")
        print(SEPARATOR)
    return 0
