"""What the commands share: model and sampling flags, fast checks before torch, the loading line, --json
output, and the library's error messages rephrased in the command line's words.

Nothing here imports torch at module level: `llamaforge --help`, a missing path or a busy port answer
in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import socket
import sys
from pathlib import Path
from typing import Any, Optional

# One default sampling story for every interface: Meta's (generation/sampler.py's SamplingParams).
# The CLI, the chat page and HTTP requests that omit them all use these; tests pin that they agree.
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.9


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps docstring layout and appends "(default: X)" to each flag whose default means something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or isinstance(default, list)
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def flag(name: str) -> list[str]:
    """A flag's spellings: the dashed one first, Meta's underscore one as an alias (`--max-seq-len`, `--max_seq_len`)."""
    dashed = "--" + name.replace("_", "-")
    return [dashed, "--" + name] if "_" in name else [dashed]


def number(kind: type, low: float, high: Optional[float] = None):
    """An argparse type: a finite `kind` (int or float) in [low, high], else a usage error (exit 2) naming the
    range, before the model loads."""
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes {noun} {bound}, got {text!r}") from None
        if not (low <= value < float("inf") and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"must be {noun} {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_model_flags(parser: argparse.ArgumentParser, *, max_seq_len: Any = None, max_batch_size: int = 4) -> None:
    """MODEL (positional) or Meta's --ckpt-dir, plus --tokenizer-path, devices and context size."""
    parser.add_argument("model", nargs="?", default=None,
                        help="checkpoint: Meta folder, Hugging Face folder, .gguf file, or a model reference "
                             "org/name[:QUANT][@REVISION] (default: SmolLM2-135M-Instruct)")
    parser.add_argument(*flag("ckpt_dir"), dest="ckpt_dir", default=None, help="same as MODEL (Meta's flag)")
    parser.add_argument(*flag("tokenizer_path"), dest="tokenizer_path", default=None,
                        help="tokenizer.model / tokenizer.json, when the checkpoint carries none")
    parser.add_argument(*flag("max_seq_len"), dest="max_seq_len", type=number(int, 1), default=max_seq_len,
                        help="longest prompt + answer in tokens" + ("" if max_seq_len else
                                                                    " (default: the model's context length)"))
    parser.add_argument(*flag("max_batch_size"), dest="max_batch_size", type=number(int, 1),
                        default=max_batch_size, help="most prompts per batch")
    parser.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16 or float16 (default: by device; quantized GGUF stays quantized on CPU)")
    parser.add_argument(*flag("kv_type"), dest="kv_type", default=None,
                        help="KV cache element type: float32, float16, bfloat16 or q8_0 (f32/f16/bf16 too; "
                             "default: float16 for quantized GGUF on the CPU, else the model's dtype)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (Meta's build seeds with 1)")
    parser.add_argument("--compile", action="store_true",
                        help="decode steps through torch.compile (CUDA graphs on a GPU; the first step compiles)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and where, and speeds")


def add_sampling_flags(parser: argparse.ArgumentParser, *, max_gen_len: Any = None) -> None:
    """--temperature, --top-p, --top-k and --max-gen-len, with Meta's defaults."""
    parser.add_argument("--temperature", type=number(float, 0), default=DEFAULT_TEMPERATURE, help="0 is greedy")
    parser.add_argument(*flag("top_p"), dest="top_p", type=number(float, 0, 1), default=DEFAULT_TOP_P,
                        help="nucleus threshold (Meta's top-p)")
    parser.add_argument(*flag("top_k"), dest="top_k", type=number(int, 1), default=None,
                        help="keep only the k most likely tokens (default: all)")
    parser.add_argument(*flag("max_gen_len"), "-n", dest="max_gen_len", type=number(int, 0),
                        default=max_gen_len,
                        help="most tokens to generate")


# -- checks before any heavy import ----------------------------------------------------------------------

class UsageError(Exception):
    """Bad command-line input found by the CLI itself; main() prints it and exits with status 2."""


def looks_like_path(value: str) -> bool:
    """True when MODEL is meant as a local path, not a model reference (`org/name[:quant][@rev]`, an alias
    such as `llama3.2`, `hf.co/org/name:Q4_K_M`): the hub's own parser decides."""
    from llamaforge.hub.refs import parse_ref

    if value.startswith(("/", "./", "../", "~", ".\\")) or "\\" in value:
        return True
    return parse_ref(value) is None


def check_model_path(value: Optional[str], flag_name: str = "MODEL") -> None:
    """Fail at once (before torch is imported) when a local checkpoint path does not exist."""
    if value is None or not looks_like_path(value):
        return
    path = Path(value).expanduser()
    if not path.exists():
        nearest = _nearest_parent(path)
        hint = f"; the nearest existing folder is {nearest}" if nearest != path.anchor else ""
        raise UsageError(f"{flag_name} {value} does not exist{hint}")


def _nearest_parent(path: Path) -> str:
    for parent in path.absolute().parents:
        if parent.is_dir():
            return str(parent)
    return "/"


def check_port_free(host: str, port: int) -> None:
    """Fail at once when `host:port` cannot be bound (taken, or not an address of this machine)."""
    if not 0 < port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
                raise UsageError(f"port {port} on {host} is already in use; choose another with --port "
                                 f"(e.g. --port {port + 1})") from None
            raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}); check --host and --port") from None


# -- loading -----------------------------------------------------------------------------------------------

def describe_size(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} GB"


def announce_loading(path: Path, device: str) -> None:
    """Say 'loading NAME (size, format, device)' on stderr: name and size at once, the rest once torch is in."""
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    print(f"loading {path.name} ({describe_size(size)}", end="", file=sys.stderr, flush=True)
    tail = ")"
    try:
        from llamaforge import devices
        from llamaforge.checkpoints import detect

        tail = f", {detect.locate(path).format}, {devices.resolve_device(device)})"
    finally:
        print(tail, file=sys.stderr, flush=True)


_FROM_FLAGS = object()


def build_from_flags(args: argparse.Namespace, *, max_seq_len: Any = _FROM_FLAGS):
    """Build a Llama from parsed flags (MODEL and --ckpt-dir are the same thing), saying what loads first.

    Args:
        max_seq_len: overrides --max-seq-len (serve sizes the context itself after loading).
    """
    if args.model and args.ckpt_dir and args.model != args.ckpt_dir:
        raise UsageError(f"MODEL ({args.model}) and --ckpt-dir ({args.ckpt_dir}) disagree; give one")
    model = args.model or args.ckpt_dir
    check_model_path(model, "MODEL" if args.model else "--ckpt-dir")
    check_model_path(args.tokenizer_path, "--tokenizer-path")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from llamaforge.default_model import default_model_path

    path = Path(model).expanduser() if model else default_model_path()
    if path.exists():
        announce_loading(path, args.device)
    from llamaforge.api import Llama

    return Llama.build(
        ckpt_dir=model if model else None,
        tokenizer_path=args.tokenizer_path,
        max_seq_len=args.max_seq_len if max_seq_len is _FROM_FLAGS else max_seq_len,
        max_batch_size=args.max_batch_size,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        kv_type=args.kv_type,
    )


# -- output ------------------------------------------------------------------------------------------------

def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """--json: one JSON document on stdout instead of text (for scripts)."""
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout (for scripts)")


def print_json(obj: Any) -> None:
    """Write `obj` as indented JSON on stdout (paths and other objects as strings)."""
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str), flush=True)


# -- errors in the command line's words --------------------------------------------------------------------

# Library argument -> the flag that sets it. The library names its arguments; the CLI renders them as flags.
FLAGS = {
    "ckpt_dir": "MODEL", "tokenizer_path": "--tokenizer-path", "max_seq_len": "--max-seq-len",
    "max_batch_size": "--max-batch-size", "max_gen_len": "--max-gen-len", "temperature": "--temperature",
    "top_p": "--top-p", "top_k": "--top-k", "device": "--device", "dtype": "--dtype", "seed": "--seed",
    "overwrite": "--overwrite", "shards": "--shards", "quantize": "--quantize", "kv_type": "--kv-type",
}
_PASS_TRUE = re.compile(r"\bpass (\w+)=True\b")
_ASSIGN = re.compile(r"\b(\w+)=(?:'([^']*)'|\"([^\"]*)\"|([\w.:-]+))")
_WORD = re.compile(r"(?<![-\w])(" + "|".join(k for k in FLAGS if "_" in k) + r")(?![\w-])")


def cli_message(exc: BaseException) -> str:
    """The library's message with its argument names as this command line's flags."""
    text = str(exc)
    text = _PASS_TRUE.sub(lambda m: f"pass {FLAGS[m[1]]}" if m[1] in FLAGS else m[0], text)

    def assign(m: re.Match) -> str:
        name = m[1]
        if name not in FLAGS or FLAGS[name] == "MODEL":
            return m[0]
        value = next(v for v in m.groups()[1:] if v is not None)
        return f"{FLAGS[name]} {value}"

    text = _ASSIGN.sub(assign, text)
    return _WORD.sub(lambda m: FLAGS[m[1]], text)
