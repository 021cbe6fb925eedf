"""Reading what a person types into `llamaforge chat`: a line editor, history, multi-line blocks.

On a terminal the line editor is prompt_toolkit (arrow keys, Ctrl-R search, bracketed paste: a pasted
text with blank lines arrives as one message), else readline where that is all there is, else plain
`input()`. History is kept across sessions in the user's state folder
(`$XDG_STATE_HOME/llamaforge/chat_history`, default `~/.local/state/...`). From a pipe, lines are read
plainly with no prompt.

A message may span lines as in Ollama: a line starting with three double quotes opens a block, and the
line that ends with three double quotes closes it. Empty lines are ignored, never an end of input.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

PROMPT, CONTINUATION = ">>> ", "... "
QUOTES = '"""'


def state_dir() -> Path:
    """The user's state folder for llamaforge (XDG's, as shells keep their history)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "llamaforge"


def history_path() -> Path:
    return state_dir() / "chat_history"


class LineReader:
    """Plain `input()`: from a pipe (no prompt shown) or a terminal without any line editor."""

    kind = "plain"

    def __init__(self, show_prompt: bool):
        self.show_prompt = show_prompt

    def read(self, prompt: str) -> str:
        """One line, without its newline; raises EOFError at the end of input, KeyboardInterrupt on Ctrl-C."""
        return input(prompt if self.show_prompt else "")

    def close(self) -> None:
        pass


class ReadlineReader(LineReader):
    """`input()` with GNU readline / libedit editing and a history file."""

    kind = "readline"

    def __init__(self, history: Path):
        import readline

        super().__init__(show_prompt=True)
        self.readline, self.history = readline, history
        try:
            readline.read_history_file(history)
        except OSError:
            pass  # no history yet

    def close(self) -> None:
        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            self.readline.set_history_length(1000)
            self.readline.write_history_file(self.history)
        except OSError:
            pass


class PromptToolkitReader(LineReader):
    """prompt_toolkit's line editor with a history file (written as each line is entered)."""

    kind = "prompt_toolkit"

    def __init__(self, history: Path):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        super().__init__(show_prompt=True)
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            store = FileHistory(str(history))
        except OSError:
            store = InMemoryHistory()
        self.session = PromptSession(history=store)

    def read(self, prompt: str) -> str:
        return self.session.prompt(prompt)


def make_reader(interactive: bool, history: Optional[Path] = None) -> LineReader:
    """The best line reader this terminal and installation allow."""
    if not interactive:
        return LineReader(show_prompt=False)
    history = history or history_path()
    try:
        return PromptToolkitReader(history)
    except ImportError:
        pass
    except Exception as exc:  # prompt_toolkit refuses some terminals (e.g. no console on Windows)
        print(f"(line editor unavailable: {exc}; using plain input)", file=sys.stderr)
    try:
        return ReadlineReader(history)
    except ImportError:
        return LineReader(show_prompt=True)


def read_message(reader: LineReader) -> str:
    """The next non-empty message: one line, or a triple-quoted block of lines.

    Raises:
        EOFError: end of input (Ctrl-D), also inside an unfinished block.
        KeyboardInterrupt: Ctrl-C (an unfinished block is dropped).
    """
    while True:
        line = reader.read(PROMPT)
        if not line.strip():
            continue
        if not line.lstrip().startswith(QUOTES):
            return line.strip() if "\n" not in line else line.strip("\n")
        first = line.lstrip()[len(QUOTES):]
        if first.rstrip().endswith(QUOTES):
            text = first.rstrip()[: -len(QUOTES)]
        else:
            parts = [first]
            while True:
                more = reader.read(CONTINUATION)
                if more.rstrip().endswith(QUOTES):
                    parts.append(more.rstrip()[: -len(QUOTES)])
                    break
                parts.append(more)
            text = "\n".join(parts)
        if text.strip():
            return text.strip("\n")
