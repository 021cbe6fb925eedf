"""The sandbox chat templates render in: jinja2's immutable sandbox plus limits on time and size.

A chat template comes from a model file, so it is untrusted code. jinja2's `ImmutableSandboxedEnvironment`
stops it from reaching Python internals or mutating its inputs; this module adds what the sandbox
does not bound, so a hostile or broken template cannot hang a worker or exhaust memory:

- time and memory: a render past `RENDER_SECONDS`, or one that grows the process by more than
  `MAX_MEMORY` (strings kept in lists or namespaces, no single one too large), is stopped by a watchdog
  thread (an exception raised in the rendering thread at its next bytecode, so loops with no output stop too);
- size: the rendered text is at most `MAX_OUTPUT` characters; `*`, `**` and `%` on strings, lists and
  numbers, every call or filter given a size larger than that, and `replace` / `join` / `indent` /
  `format` (filters and str methods) whose result would be larger, are refused before they run (a
  C-level string operation cannot be stopped once started);
- loops: `range` is jinja2's bounded one (`jinja2.sandbox.MAX_RANGE` items);
- recursion: a macro that calls itself without end is Python's RecursionError, caught.

Every failure (these, and any error the template raises: undefined names, division by zero,
`raise_exception`) is a ChatFormatError naming where the template came from.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import re
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from llamaforge.errors import ChatFormatError

RENDER_SECONDS = 5.0
MAX_MEMORY = 1 << 30  # bytes a render may grow the process by (watched, so a little more can slip through)
POLL_SECONDS = 0.01
MAX_OUTPUT = 1 << 24  # characters of rendered prompt (16M: far beyond any context window)
MAX_POWER = 1 << 12  # largest exponent `**` may take

_WIDE_FORMAT = re.compile(r"%[-+ #0]*(\*|\d{6,})|%[-+ #0]*\d*\.(\*|\d{6,})")


class _Timeout(BaseException):
    """Raised inside a render that ran past its time (BaseException: a template cannot catch it)."""


class _OutOfMemory(BaseException):
    """Raised inside a render once the process grew by more than MAX_MEMORY."""


class _TooLarge(Exception):
    pass


def _sized(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


def _check_size(n: Any, what: str) -> None:
    if isinstance(n, int) and not isinstance(n, bool) and n > MAX_OUTPUT:
        raise _TooLarge(f"{what} asks for {n} characters or items, more than the limit of {MAX_OUTPUT}")


CACHE_ENV = "LLAMAFORGE_TEMPLATE_CACHE"  # a folder for the marks of templates that compiled, or "off"


def _mark(template: str) -> Path | None:
    """Where the mark that `template` compiled with this jinja2 and this sandbox lives (None: marks are off).

    Named by a SHA-256 of the template and of the identity (path, size, mtime) of jinja2's package and of this
    file, so another jinja2 or another sandbox compiles the template again."""
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() in ("off", "0", "false", "no"):
        return None
    import importlib.util

    spec = importlib.util.find_spec("jinja2")  # without importing it (~30 ms)
    if spec is None or spec.origin is None:
        return None
    digest = hashlib.sha256(template.encode("utf-8", "surrogatepass"))
    for file in (spec.origin, __file__):
        st = os.stat(file)
        digest.update(f"\0{file}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(value or os.path.join(base, "llamaforge", "templates")) / f"{digest.hexdigest()[:40]}.ok"


def compiled_before(template: str) -> bool:
    """Whether `template` compiled before with this jinja2 and sandbox (its mark exists): then `Llama.build` can
    leave importing jinja2 and compiling it (~40 ms of one core) to the first chat, knowing it compiles."""
    try:
        mark = _mark(template)
        return mark is not None and mark.is_file()
    except OSError:
        return False


def remember_compiled(template: str) -> None:
    """Mark `template` as one that compiles (an empty file; a folder that cannot be written only means no mark)."""
    try:
        mark = _mark(template)
        if mark is not None:
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.touch()
    except OSError:
        pass


def environment() -> Any:
    """A jinja2 environment for chat templates: transformers' globals and filters, sandboxed and bounded."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): render the body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if _sized(seq) and isinstance(n, int):
                        _check_size(_sized(seq) * n, f"'*' on a {type(seq).__name__}")
            elif operator == "**":
                if isinstance(right, (int, float)) and abs(right) > MAX_POWER and isinstance(left, int) \
                        and abs(left) > 1:
                    raise _TooLarge(f"'**' with exponent {right} (the limit is {MAX_POWER})")
            elif operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
                raise _TooLarge(f"'%' with a field width or precision of 6+ digits or '*' ({left[:40]!r})")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            for a in (*args, *kwargs.values()):
                _check_size(a, f"calling {getattr(__obj, '__name__', type(__obj).__name__)}")
            _check_str_method(__obj, args, kwargs)
            out = super().call(__context, __obj, *args, **kwargs)
            if _sized(out) > MAX_OUTPUT:
                raise _TooLarge(f"{getattr(__obj, '__name__', 'a call')} made {_sized(out)} characters or items")
            return out

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        _check_size(indent, "tojson")
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                             extensions=[GenerationTag, jinja2.ext.loopcontrols])
    for name in ("center", "indent", "wordwrap", "truncate", "format", "batch", "slice", "replace", "join"):
        env.filters[name] = _bounded_filter(env.filters[name], name)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _bounded_filter(f: Callable[..., Any], name: str) -> Callable[..., Any]:
    skip = 1 if hasattr(f, "jinja_pass_arg") else 0  # the context/environment jinja2 passes first

    @functools.wraps(f)  # keeps jinja2's pass_environment / pass_eval_context marker
    def bounded(*args: Any, **kwargs: Any) -> Any:
        subject, rest = (args[skip], args[skip + 1:]) if len(args) > skip else (None, ())
        for a in (*rest, *kwargs.values()):
            _check_size(a, f"the {name} filter")
        _check_growth(name, subject, rest, kwargs, f"the {name} filter")
        return f(*args, **kwargs)

    return bounded


_WIDE_BRACE_FORMAT = re.compile(r"\{[^{}]*:[^{}]*(\d{6,}|\{)")


def _check_growth(name: str, subject: Any, args: tuple, kwargs: dict, what: str) -> None:
    """Refuse, before it runs, a str operation whose result would pass MAX_OUTPUT (C code cannot be stopped)."""
    if name == "replace" and isinstance(subject, str) and len(args) >= 2 and isinstance(args[1], str):
        old = args[0] if isinstance(args[0], str) else str(args[0])
        hits = len(subject) + 1 if old == "" else subject.count(old)
        _check_size(len(subject) + hits * len(args[1]), what)
    elif name == "join" and isinstance(subject, (list, tuple)):
        sep = args[0] if args and isinstance(args[0], str) else kwargs.get("d", "")
        _check_size(sum(len(x) if isinstance(x, str) else 16 for x in subject) + len(subject) * len(sep), what)
    elif name == "indent" and isinstance(subject, str):
        width = args[0] if args else kwargs.get("width", 4)
        per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        _check_size(len(subject) + (subject.count("\n") + 1) * per_line, what)
    elif name == "format" and isinstance(subject, str) and (_WIDE_FORMAT.search(subject)
                                                            or _WIDE_BRACE_FORMAT.search(subject)):
        raise _TooLarge(f"{what} with a field width of 6+ digits or a nested width ({subject[:40]!r})")


def _check_str_method(method: Any, args: tuple, kwargs: dict) -> None:
    """The growth check for a str method a template calls (`s.replace(...)`, `sep.join(...)`, `s.format(...)`)."""
    method = getattr(method, "__wrapped__", method)  # jinja2 wraps str.format in its own formatter
    owner = getattr(method, "__self__", None)
    name = getattr(method, "__name__", "")
    if isinstance(owner, str):
        if name == "join" and args:
            _check_growth("join", args[0], (owner,), {}, "calling str.join")
        elif name in ("replace", "format", "format_map"):
            _check_growth("format" if name == "format_map" else name, owner, args, kwargs, f"calling str.{name}")


def render(template: Any, context: dict[str, Any], origin: str, seconds: float | None = None) -> str:
    """Render a compiled template within the time (default `RENDER_SECONDS`) and size limits.

    Raises:
        ChatFormatError: the template failed, ran too long or made too much text; the message names `origin`.
    """
    seconds = RENDER_SECONDS if seconds is None else seconds
    chunks: list[str] = []

    def run() -> None:
        total = 0
        for chunk in template.generate(**context):
            total += len(chunk)
            if total > MAX_OUTPUT:
                raise _TooLarge(f"it rendered more than {MAX_OUTPUT} characters")
            chunks.append(chunk)

    try:
        _with_deadline(run, seconds)
    except _Timeout:
        raise ChatFormatError(f"{origin} ran longer than {seconds:g} s and was stopped; the template loops "
                              "too much for this dialog (or without end)") from None
    except _OutOfMemory:
        raise ChatFormatError(f"{origin} was stopped: rendering it took more than {MAX_MEMORY >> 20} MiB of "
                              "memory") from None
    except _TooLarge as e:
        raise ChatFormatError(f"{origin} was stopped: {e}") from None
    except RecursionError:
        raise ChatFormatError(f"{origin} recursed without end (a macro that calls itself?)") from None
    except ChatFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - anything a template does wrong: undefined, 1/0, raise_exception...
        raise ChatFormatError(f"{origin} failed on this dialog: {type(e).__name__}: {e}") from e
    return "".join(chunks)


def _rss_bytes() -> int | None:
    """This process's resident memory (Linux /proc), or None where it cannot be read cheaply."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _with_deadline(fn: Callable[[], None], seconds: float) -> None:
    """Run `fn` in this thread; past `seconds`, or once the process has grown by more than MAX_MEMORY
    bytes, raise _Timeout / _OutOfMemory inside it (CPython's async exception, checked every POLL_SECONDS)."""
    tid = threading.get_ident()
    lock = threading.Lock()
    state: dict[str, Any] = {"done": False, "fired": None}
    done = threading.Event()
    start, base = time.monotonic(), _rss_bytes()

    def fire(exc: type[BaseException]) -> None:
        with lock:
            if not state["done"]:
                state["fired"] = exc
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(exc))

    def watch() -> None:
        while not done.wait(POLL_SECONDS):
            if time.monotonic() - start > seconds:
                return fire(_Timeout)
            rss = _rss_bytes() if base is not None else None
            if rss is not None and rss - base > MAX_MEMORY:
                return fire(_OutOfMemory)

    watcher = threading.Thread(target=watch, name="chat-template-watchdog", daemon=True)
    watcher.start()
    try:
        fn()
    finally:
        with lock:
            state["done"] = True
            if state["fired"] is not None:  # if not delivered yet, withdraw it so it cannot surface in the caller
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)
        done.set()
