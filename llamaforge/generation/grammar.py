"""Constrained decoding for `response_format` and forced tool calls, with llguidance.

llguidance (Microsoft's low-level guidance library, also used by llama.cpp and vLLM) compiles a JSON
schema to a grammar over the model's own token table and, at each step, says which tokens may come
next; the sampler sets the others to -inf. The output is then valid JSON matching the schema whenever
generation ends by itself (a `length` finish can still cut it short, as with OpenAI). JSON is written
with ", " and ": " separators and no other whitespace, so a small model cannot wander off in spaces.

The token table comes from `Tokenizer.token_bytes_table()`; control tokens are marked (0xFF prefix, llguidance's
convention) so they never satisfy a grammar, and the request's stop ids are the grammar's end tokens.

Throughput (at 16 streams the masks cost ~10% of the engine's CPU time when done naively): each sequence's
next mask is computed ahead, on one worker thread, as soon as its last token is consumed, so it is ready when
the decode step that runs meanwhile (C++ and llguidance both release the GIL) returns; and a greedy row only
checks whether the model's own best token is allowed (`allows`, one bit), which is the masked argmax whenever
it is, before building a (V,) mask.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import threading
from typing import Any, Callable, Optional

import numpy as np
import torch

from llamaforge.errors import GenerationError, LlamaforgeError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(GenerationError):
    """The schema cannot be compiled (the message says why); a 400 for the client."""


class GrammarUnavailable(LlamaforgeError, RuntimeError):
    """llguidance is not installed."""


_AHEAD: Optional[concurrent.futures.ThreadPoolExecutor] = None
_AHEAD_LOCK = threading.Lock()


def _ahead() -> concurrent.futures.ThreadPoolExecutor:
    """The one worker thread that computes next-token masks ahead (made on first use)."""
    global _AHEAD
    with _AHEAD_LOCK:
        if _AHEAD is None:
            _AHEAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamaforge-masks")
        return _AHEAD


class LLGuidanceConstraint:
    """One sequence's grammar state, as the sampler's `Constraint`.

    The matcher is only touched by one thread at a time: the worker computes the next mask between
    `advance` (which submits it) and the first `allowed` / `allows` / `advance` after it (which wait for it).
    """

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._stopped = matcher.is_stopped()
        self._next: Optional[concurrent.futures.Future] = None  # the next mask's bytes, being computed
        self._mask: Optional[bytes] = None  # the next mask's bytes: bit j of little-endian word i is token 32i + j
        self._compute_ahead()

    def _compute_ahead(self) -> None:
        self._mask = None
        self._next = None if self._stopped else _ahead().submit(self.matcher.compute_bitmask)

    def _words(self) -> bytes:
        if self._mask is None:
            self._mask = self._next.result() if self._next is not None else self.matcher.compute_bitmask()
            self._next = None
        return self._mask

    def allowed(self) -> torch.Tensor:
        # numpy's unpackbits, single-threaded: torch's shifts over (V/32, 32) wake the OpenMP pool, which cost
        # ~40 ms a call on a loaded 2-core machine. Little-endian bit order: bit j of byte i is token 8i + j.
        bits = np.unpackbits(np.frombuffer(self._words(), dtype=np.uint8), bitorder="little")
        out = np.zeros(self.vocab_size, dtype=bool)
        n = min(self.vocab_size, bits.size)
        out[:n] = bits[:n]
        return torch.from_numpy(out)

    def allows(self, token: int) -> bool:
        """Whether `token` may come next (one bit of the mask)."""
        mask = self._words()
        return 0 <= token < min(self.vocab_size, 8 * len(mask)) and bool((mask[token >> 3] >> (token & 7)) & 1)

    def advance(self, token: int) -> None:
        if self._next is not None:
            self._next.result()  # the worker is done with the matcher
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar rejected token {token}: {self.matcher.get_error()}")
        self._stopped = self.matcher.is_stopped()
        self._compute_ahead()

    def is_finished(self) -> bool:
        return self._stopped


class GrammarCompiler:
    """Builds constraint factories for one tokenizer; the llguidance token table is made once, lazily."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = sorted(stop_ids)
        self._lltok = None
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("llguidance") is not None

    def _tokenizer(self):
        with self._lock:
            if self._lltok is None:
                try:
                    import llguidance
                except ImportError as exc:
                    raise GrammarUnavailable(
                        "structured output needs the llguidance package: pip install 'llamaforge[serve]'"
                    ) from exc
                tok = self.tokenizer
                specials = tok.special_ids
                table = [b"\xff" + t if i in specials else t for i, t in enumerate(tok.token_bytes_table())]
                table += [b""] * (self.vocab_size - len(table))  # model rows past the tokenizer's vocabulary

                class _Wrapped:
                    eos_token_id = self.stop_ids[0] if self.stop_ids else tok.eos_id
                    bos_token_id = tok.bos_id
                    tokens = table
                    special_token_ids = sorted(specials)

                    def __call__(self, text):
                        if isinstance(text, bytes):
                            text = text.decode("utf-8", errors="replace")
                        return tok.encode(text)

                self._lltok = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(_Wrapped()), eos_token=self.stop_ids or None
                )
            return self._lltok

    def json_schema(self, schema: Optional[dict]) -> Callable[[], LLGuidanceConstraint]:
        """A factory of constraints for JSON matching `schema` (None: any JSON object).

        Raises:
            GrammarError: the schema is not one llguidance can compile (the reason is in the message).
            GrammarUnavailable: llguidance is not installed.
        """
        lltok = self._tokenizer()  # GrammarUnavailable without llguidance
        import llguidance

        schema = {"type": "object"} if schema is None else schema
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"the JSON schema is not valid: {exc}") from exc
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
        if is_error:
            raise GrammarError(f"the JSON schema cannot be used for constrained decoding: {messages[0]}")
        template = llguidance.LLMatcher(lltok, grammar, log_level=0)
        if template.is_error():
            raise GrammarError(f"the JSON schema cannot be used for constrained decoding: {template.get_error()}")
        return lambda: LLGuidanceConstraint(template.deep_copy(), self.vocab_size)

    def response_format(self, fmt: Any) -> Optional[Callable[[], LLGuidanceConstraint]]:
        """Constraints for OpenAI's `response_format`: {"type": "text" | "json_object"} or
        {"type": "json_schema", "json_schema": {"schema": {...}}}; None for plain text.

        Raises:
            GrammarError: the value is not one of those shapes, or its schema cannot be compiled.
            GrammarUnavailable: llguidance is not installed.
        """
        if fmt is None:
            return None
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return self.json_schema(None)
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise GrammarError("response_format json_schema needs json_schema.schema (a JSON schema object)")
            return self.json_schema(schema)
        raise GrammarError(f'response_format must be {{"type": "text" | "json_object" | "json_schema", ...}}, '
                           f"got {fmt!r}")
