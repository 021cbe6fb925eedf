"""`llamaforge chat`: talk to a model in a terminal.

    >>> Hello!                       a message (Enter sends it; empty lines are ignored)
    >>> \"\"\"                            a message over several lines, closed by a line ending in \"\"\"
    >>> /help                        the commands below; nothing starting with / goes to the model

The answer streams as it is generated; Ctrl-C stops it (what was said so far stays in the conversation),
Ctrl-D or /bye leaves. When the conversation outgrows the context, the oldest exchanges are dropped (the
system prompt stays) and a note says so. From a pipe, each line is one message and each answer one line
(notes on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from llamaforge.cli.common import add_model_flags, add_sampling_flags, build_from_flags
from llamaforge.cli.line_input import make_reader, read_message

HELP = """commands:
  /help               this list
  /system [TEXT]      show the system prompt, or set it (the conversation is kept)
  /set                show the sampling settings
  /set NAME VALUE     temperature, top_p, top_k, max_gen_len, seed ('none' unsets top_k / seed), verbose on|off
  /reset              forget the conversation (asks first; the system prompt stays)
  /save FILE          write the conversation and settings to a JSON file
  /load FILE          read a conversation written by /save (or a JSON list of messages)
  /bye                leave (also /exit, /quit, Ctrl-D)
  \"\"\"                 start or end a message of several lines
  Ctrl-C stops an answer; Up/Down walk the history of what you typed (kept across sessions)."""

ROLES = ("system", "user", "assistant")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat (streaming, history, /commands)", description=__doc__)
    add_model_flags(p, max_batch_size=1)
    add_sampling_flags(p, max_gen_len=512)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(run=run)


class Settings:
    """The sampling settings `/set` changes, each parsed and checked as it is set."""

    def __init__(self, args: argparse.Namespace):
        self.values: dict[str, Any] = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                                       "max_gen_len": args.max_gen_len, "seed": None, "verbose": args.verbose}

    ALIASES = {"top-p": "top_p", "top-k": "top_k", "max-gen-len": "max_gen_len", "max_tokens": "max_gen_len",
               "num_predict": "max_gen_len", "temp": "temperature"}

    def set(self, name: str, text: str) -> str:
        name = self.ALIASES.get(name, name)
        parsers: dict[str, Callable[[str], Any]] = {
            "temperature": lambda v: _number(v, float, 0.0, None, "temperature", "0 is greedy"),
            "top_p": lambda v: _number(v, float, 0.0, 1.0, "top_p", "nucleus threshold in (0, 1]", open_low=True),
            "top_k": lambda v: None if v == "none" else _number(v, int, 1, None, "top_k", "'none' keeps all"),
            "max_gen_len": lambda v: _number(v, int, 1, None, "max_gen_len", "most tokens per answer"),
            "seed": lambda v: None if v == "none" else _number(v, int, None, None, "seed", "'none' for a fresh draw"),
            "verbose": _on_off,
        }
        if name not in parsers:
            raise ValueError(f"no setting {name!r}; settings: {', '.join(parsers)}")
        self.values[name] = parsers[name](text.strip())
        return f"{name} = {self.values[name]}"

    def show(self) -> str:
        return "  ".join(f"{k} = {v}" for k, v in self.values.items())


def _number(text: str, kind: type, low, high, name: str, hint: str, open_low: bool = False):
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name} takes a{'n integer' if kind is int else ' number'} ({hint}), got {text!r}") from None
    if (low is not None and (value < low or (open_low and value == low))) or (high is not None and value > high):
        bound = f"in ({low}, {high}]" if open_low else f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _on_off(text: str) -> bool:
    if text.lower() in ("on", "true", "1", "yes"):
        return True
    if text.lower() in ("off", "false", "0", "no"):
        return False
    raise ValueError(f"verbose takes on or off, got {text!r}")


class ChatSession:
    """A conversation with one model: the messages, the settings, and the commands that change them."""

    def __init__(self, generator, settings: Settings, system: Optional[str], *, interactive: bool = True):
        self.generator, self.settings, self.interactive = generator, settings, interactive
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def say(self, text: str) -> None:
        print(text, flush=True)

    def note(self, text: str) -> None:
        """A remark on the session, not an answer: on stderr from a pipe, so stdout holds one line per answer."""
        print(text, file=sys.stdout if self.interactive else sys.stderr, flush=True)

    # -- the conversation and its context --------------------------------------------------------------

    def fit_context(self) -> Optional[int]:
        """Drop the oldest exchanges until the prompt leaves room for an answer; the answer's token budget.

        None when even the newest message alone does not fit (it is then taken back).
        """
        fmt, limit = self.generator.chat_format, self.generator.max_seq_len
        want = self.settings.values["max_gen_len"]
        reserve = min(want, max(1, limit // 2))
        n_system = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        alone = len(fmt.encode_dialog(self.messages[:n_system] + self.messages[-1:]))
        if alone >= limit:
            self.messages.pop()
            self.note(f"[this message takes {alone} tokens but the context holds {limit}; shorten it, or start "
                     f"the chat with a larger --max-seq-len]")
            return None
        dropped = 0
        n_prompt = len(fmt.encode_dialog(self.messages))
        while n_prompt + reserve > limit and len(self.messages) - n_system > 1:
            del self.messages[n_system: n_system + 2]  # the oldest user message and its answer
            dropped += 2
            n_prompt = len(fmt.encode_dialog(self.messages))
        if dropped:
            self.note(f"[context full: dropped the {dropped} oldest messages; the prompt is now {n_prompt} of "
                     f"{limit} tokens]")
        return min(want, limit - n_prompt)

    def answer(self, text: str) -> None:
        """Send one user message and stream the answer; Ctrl-C stops it and keeps what was said."""
        from llamaforge.chat import UNSAFE_ERROR, has_special_tags

        self.messages.append({"role": "user", "content": text})
        budget = self.fit_context()
        if budget is None:
            return
        gen, s = self.generator, self.settings.values
        if gen.chat_format.name == "llama2" and has_special_tags(self.messages):
            self.messages.pop()
            self.say(UNSAFE_ERROR)
            return
        prompt = gen.chat_format.encode_dialog(self.messages)
        decoder = gen.tokenizer.stream_decoder()
        pieces: list[str] = []
        n_tokens, start, first, stopped = 0, time.perf_counter(), None, False
        try:
            for token in gen.stream_tokens(prompt, budget, s["temperature"], s["top_p"], top_k=s["top_k"],
                                           seed=s["seed"], stop_ids=gen.chat_format.stop_ids):
                n_tokens += 1
                first = first or time.perf_counter()
                piece = decoder.push(token)
                if piece:
                    pieces.append(piece)
                    print(piece, end="", flush=True)
            pieces.append(decoder.flush())
            print(pieces[-1], flush=True)
        except KeyboardInterrupt:
            stopped = True
            if not self.interactive:
                print(flush=True)  # the answer's line ends
            self.note(" [stopped]")
        elapsed = time.perf_counter() - start
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})
        if s["verbose"]:
            # decode speed counts the tokens after the first (whose wait is the prompt's prefill)
            after = time.perf_counter() - first if first else 0.0
            rate = f"{(n_tokens - 1) / after:.1f} tokens/s" if n_tokens > 1 and after > 0 else "- tokens/s"
            ttft = f"{first - start:.2f}s" if first else "-"
            self.note(f"[{n_tokens} tokens in {elapsed:.2f}s: {rate}; prompt {len(prompt)} tokens, first token "
                     f"after {ttft}{', stopped' if stopped else ''}]")

    # -- commands ------------------------------------------------------------------------------------------

    def command(self, line: str, confirm: Callable[[str], bool]) -> bool:
        """Run one /command; False when the session should end."""
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        name = name.lower()
        if name in ("/bye", "/exit", "/quit"):
            return False
        if name in ("/help", "/?"):
            self.say(HELP)
        elif name == "/system":
            self.system(rest)
        elif name == "/set":
            if not rest:
                self.say(self.settings.show())
            else:
                key, _, value = rest.partition(" ")
                self.say(self.settings.set(key.strip().lower(), value) if value.strip()
                         else f"/set {key} needs a value; /help shows the settings")
        elif name == "/reset":
            n = sum(m["role"] != "system" for m in self.messages)
            if n == 0:
                self.say("nothing to forget: the conversation is empty")
            elif confirm(f"forget the {n} messages of this conversation? [y/N] "):
                self.messages = [m for m in self.messages if m["role"] == "system"]
                self.say(f"conversation cleared ({n} messages forgotten" +
                         ("; the system prompt stays)" if self.messages else ")"))
            else:
                self.say("kept the conversation")
        elif name == "/save":
            self.save(rest)
        elif name == "/load":
            self.load(rest)
        else:
            self.say(f"unknown command {name}; /help lists the commands")
        return True

    def system(self, text: str) -> None:
        has = bool(self.messages) and self.messages[0]["role"] == "system"
        if not text:
            self.say(f"system prompt: {self.messages[0]['content']}" if has else "no system prompt; /system TEXT sets one")
            return
        if has:
            self.messages[0]["content"] = text
        else:
            self.messages.insert(0, {"role": "system", "content": text})
        self.say("system prompt set")

    def save(self, name: str) -> None:
        from llamaforge.checkpoints.save import umask_mode

        if not name:
            raise ValueError("/save needs a file name, e.g. /save chat.json")
        out = Path(name).expanduser()
        doc = {"llamaforge_chat": 1, "model": str(getattr(self.generator, "source", "")),
               "settings": self.settings.values, "messages": self.messages}
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2, ensure_ascii=False)
            os.chmod(tmp, umask_mode())
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.say(f"saved {len(self.messages)} messages to {out}")

    def load(self, name: str) -> None:
        if not name:
            raise ValueError("/load needs a file name, e.g. /load chat.json")
        path = Path(name).expanduser()
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a JSON conversation ({exc})") from None
        messages = doc.get("messages") if isinstance(doc, dict) else doc
        self.messages = check_messages(messages, path)
        if isinstance(doc, dict) and isinstance(doc.get("settings"), dict):
            for key, value in doc["settings"].items():
                if key in self.settings.values and key != "verbose":
                    self.settings.set(key, "none" if value is None else str(value))
        self.say(f"loaded {len(self.messages)} messages from {path}")


def check_messages(messages: Any, path: Path) -> list[dict[str, str]]:
    """Messages read from a file: roles system (first only) / user / assistant in turn, string contents."""
    if not isinstance(messages, list):
        raise ValueError(f"{path} holds no list of messages")
    out = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ValueError(f"message {i} of {path} is not {{'role': system|user|assistant, 'content': str}}")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"message {i} of {path} is a system message; only the first may be")
        out.append({"role": m["role"], "content": m["content"]})
    turns = [m["role"] for m in out if m["role"] != "system"]
    if any(role != ("user", "assistant")[i % 2] for i, role in enumerate(turns)):
        raise ValueError(f"{path}: user and assistant messages must take turns, starting with the user")
    return out


def take_ctrl_c() -> None:
    """Make Ctrl-C raise KeyboardInterrupt even when this process was started with SIGINT ignored.

    A shell without job control starts `cmd &` with SIGINT ignored, the exec keeps that, and Python then
    installs no KeyboardInterrupt handler, so a chat launched from a script or a test runner in the background
    ignored every Ctrl-C sent while an answer streamed (the line editor reads its own Ctrl-C as a key, so
    the prompt still worked). A person at the terminal means "stop the answer": take the key back."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        take_ctrl_c()
    generator = build_from_flags(args)
    session = ChatSession(generator, Settings(args), args.system, interactive=interactive)
    reader = make_reader(interactive)

    def confirm(question: str) -> bool:
        try:
            return reader.read(question).strip().lower() in ("y", "yes")
        except (EOFError, KeyboardInterrupt):
            return False

    if interactive:
        print(f"chatting with {Path(str(generator.source)).name} ({generator.max_seq_len} tokens of context). "
              f"/help for commands, Ctrl-D or /bye to leave.", flush=True)
    try:
        while True:
            try:
                text = read_message(reader)
            except KeyboardInterrupt:
                print("(Ctrl-D or /bye leaves)", flush=True)
                continue
            except EOFError:
                if interactive:
                    print()
                return 0
            if text.startswith("/"):
                try:
                    if not session.command(text, confirm):
                        return 0
                except ValueError as exc:
                    print(f"error: {exc}", flush=True)
                except OSError as exc:
                    print(f"error: {exc.strerror or exc}: {exc.filename or ''}", flush=True)
                continue
            session.answer(text)
    finally:
        reader.close()
