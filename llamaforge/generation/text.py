"""Incremental detokenization with stop strings that may span several tokens.

`TextStream.push(token)` returns the text that is safe to send now and whether a stop string was hit.
Text that could still turn into a stop string (a suffix that is a prefix of one) is held back until the
next token settles it, so a stop string never reaches the client, not even in part, and the text before
it always does. Multi-byte characters are never split (the tokenizer's stream decoder holds partial
bytes back).
"""

from __future__ import annotations

from typing import Protocol, Sequence


class StreamDecoder(Protocol):
    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class TextStream:
    """Text of one generated sequence, with stop-string detection."""

    def __init__(self, decoder: StreamDecoder, stops: Sequence[str] = ()):
        self.decoder = decoder
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.stopped = False

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a generated token; return (text to emit, whether a stop string ended the text)."""
        if self.stopped:
            return "", True
        self.pending += self.decoder.push(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """The held-back rest at the end of generation (cut at a stop string if one completes)."""
        if self.stopped:
            return ""
        self.pending += self.decoder.flush()
        text, _ = self._release(final=True)
        return text

    def _release(self, final: bool) -> tuple[str, bool]:
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out, True
        hold = 0 if final else _partial_stop_len(self.pending, self.stops)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out, False


def _partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
