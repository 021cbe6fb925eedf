"""`llamaforge chat`: talk to a model in a terminal, with history, a system prompt and streaming."""

from __future__ import annotations

import argparse
import sys

from llamaforge.cli.common import add_model_flags, add_sampling_flags, build_from_flags


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat (streaming, with history)", description=__doc__)
    add_model_flags(p)
    add_sampling_flags(p, max_gen_len=512)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    generator = build_from_flags(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with the model. Empty line or Ctrl-D to quit, /reset to clear the history.")
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        pieces = []
        try:
            for piece in generator.stream_chat_completion(
                history, args.max_gen_len, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k
            ):
                pieces.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print()
        history.append({"role": "assistant", "content": "".join(pieces)})
