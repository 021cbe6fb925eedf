"""`llamaforge run MODEL [PROMPT...]`: Ollama's `run`: chat with a model, or answer one message and exit.

    llamaforge run MODEL                      a chat on a terminal (`llamaforge chat`)
    llamaforge run MODEL why is the sky blue  answers that message and exits
    echo "why is the sky blue" | llamaforge run MODEL
    cat notes.txt | llamaforge run MODEL summarize this

As Ollama does, text on stdin comes first, then the PROMPT words, joined by a space, as one user message in
the model's chat format. The answer streams to stdout; the loading line goes to stderr. Flags go before
MODEL or after it; words after the flags are part of PROMPT too.
"""

from __future__ import annotations

import argparse
import sys

from llamaforge.cli import chat
from llamaforge.cli.common import UsageError, add_model_flags, add_sampling_flags, build_from_flags


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="chat with a model, or answer one message and exit (as `ollama run`)",
                       description=__doc__)
    add_model_flags(p, max_batch_size=1)
    add_sampling_flags(p, max_gen_len=512)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("prompt", nargs="*", default=[], help="a message to answer, then exit (default: a chat)")
    p.set_defaults(run=run, trailing_words="prompt")


def message(words: list[str], stdin) -> str | None:
    """The one message to answer (stdin's text, then the words), or None for a chat."""
    piped = None if stdin.isatty() else stdin.read()
    if piped is None and not words:
        return None
    text = " ".join(part for part in (piped.strip() if piped else "", " ".join(words)) if part)
    if not text.strip():
        raise UsageError("nothing to answer: stdin was empty and no PROMPT was given "
                         "(`llamaforge run MODEL PROMPT`, or pipe text in)")
    return text


def run(args: argparse.Namespace) -> int:
    text = message(args.prompt, sys.stdin)
    if text is None:
        return chat.run(args)
    llama = build_from_flags(args)
    dialog = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": text}]
    for piece in llama.stream_chat_completion(dialog, args.max_gen_len, args.temperature, args.top_p,
                                              top_k=args.top_k):
        print(piece, end="", flush=True)
    print(flush=True)
    return 0
