"""Entry point of the `llamaforge` command: builds the parser from one module per command."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from llamaforge.errors import LlamaforgeError

# Each module has `register(subparsers)`; heavy imports happen inside its `run`.
COMMANDS = ["demo", "generate", "chat", "info", "convert", "quantize", "pull", "list", "rm", "show"]
OPTIONAL_COMMANDS = ["serve", "train", "eval", "tokenizer"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamaforge", description="Build, run, serve and train Llama-family models on any machine."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS + OPTIONAL_COMMANDS:
        try:
            module = importlib.import_module(f"llamaforge.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"llamaforge.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except LlamaforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
