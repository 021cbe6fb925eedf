"""Entry point of the `llamaforge` command: builds the parser from one module per command.

Conventions every command gets from here: flags shown with their defaults, `--version`, "did you mean"
for a mistyped command or flag, and errors printed as one line in the command line's words (exit 1 for
a failure of the work, 2 for bad usage, 130 for Ctrl-C, 141 when the reader of stdout left).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import sys
from typing import Optional, Sequence

from llamaforge import __version__
from llamaforge.cli.common import HelpFormatter, UsageError, cli_message
from llamaforge.errors import LlamaforgeError

# Each module has `register(subparsers)`; heavy imports happen inside its `run`.
COMMANDS = ["demo", "run", "generate", "chat", "info", "convert", "quantize", "pull", "list", "rm", "show"]
OPTIONAL_COMMANDS = ["serve", "train", "eval", "tokenizer"]


class Parser(argparse.ArgumentParser):
    """argparse with defaults in the help and suggestions for near misses."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("formatter_class") in (None, argparse.HelpFormatter, argparse.RawDescriptionHelpFormatter):
            kwargs["formatter_class"] = HelpFormatter  # it keeps a docstring's layout too
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        choice = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = re.findall(r"'([^']*)'", choice[3]) or [c.strip() for c in choice[3].split(",")]
            message += did_you_mean(choice[2], options)
        super().error(message)

    def option_strings(self) -> dict[str, str]:
        """Every spelling of every flag -> the flag's main spelling."""
        return {s: action.option_strings[-1 if action.option_strings[0].startswith("-") and
                                            not action.option_strings[0].startswith("--") else 0]
                for action in self._actions for s in action.option_strings}


def did_you_mean(word: str, options: Sequence[str] | dict[str, str]) -> str:
    main_spelling = options if isinstance(options, dict) else {o: o for o in options}
    close = difflib.get_close_matches(word, list(main_spelling), n=4, cutoff=0.6)
    unique = list(dict.fromkeys(main_spelling[c] for c in close))[:2]
    return f"; did you mean {' or '.join(unique)}?" if unique else ""


def build_parser() -> Parser:
    parser = Parser(prog="llamaforge", description="Build, run, serve and train Llama-family models on any machine.")
    parser.add_argument("--version", action="version", version=f"llamaforge {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS + OPTIONAL_COMMANDS:
        try:
            module = importlib.import_module(f"llamaforge.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"llamaforge.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def _chosen_parser(parser: Parser, args: argparse.Namespace) -> Parser:
    """The (sub)command parser the arguments selected, so an unknown flag is judged against its flags."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if chosen is not None:
                return _chosen_parser(chosen, args)
    return parser


def parse(parser: Parser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    args, extras = parser.parse_known_args(argv)
    words = getattr(args, "trailing_words", None)  # `run MODEL -n 5 why ...`: the words after a flag
    if extras and words and not any(e.startswith("-") for e in extras):
        getattr(args, words).extend(extras)
        extras = []
    if extras:
        target = _chosen_parser(parser, args)
        unknown = extras[0].split("=", 1)[0]
        hint = did_you_mean(unknown, target.option_strings()) if unknown.startswith("-") else ""
        target.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LlamaforgeError as exc:
        print(f"error: {cli_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; end quietly, as a tool killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush must not fail
        return 141


if __name__ == "__main__":
    sys.exit(main())
