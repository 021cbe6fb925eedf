"""A reasoning model's thoughts apart from its answer: `<think>thoughts</think>answer` -> ("thoughts", "answer").

The rules are llama.cpp server's (`common_chat_msg_parser::try_parse_reasoning`, reasoning format "auto" /
"deepseek"), which vLLM's deepseek_r1 / qwen3 parsers and Ollama's `thinking.Parser` agree with:

- thoughts are there only if the answer opens with the opening tag (after whitespace), or if the prompt itself
  ended with it (`opened`: DeepSeek-R1's and Qwen3-Thinking's templates write `<think>\\n` into the generation
  prompt, llama.cpp's `thinking_forced_open`); anything else is all answer;
- the thoughts end at the closing tag; when it never comes (the answer ran out of tokens, or the model did not
  close), everything after the opening tag is thoughts and the answer is empty;
- the thoughts are trimmed of whitespace at both ends, and so is the start of the answer after the closing tag.

Streaming gives the same split: `push` returns what is settled, holding back text that could still be the start
of a tag (`</th` at the end of a piece) or trailing whitespace of the thoughts; `flush` returns the rest. Where
llama.cpp and Ollama drop a partial closing tag left at the very end, it stays in the thoughts here (text the
model wrote is never lost). One block of thoughts, as Ollama's parser: a second `<think>` is answer text.
"""

from __future__ import annotations

_START, _THINK, _AFTER, _ANSWER = range(4)


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper beginning of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ThinkSplit:
    """Incremental split of one answer into (thoughts, answer) pieces."""

    def __init__(self, tags: tuple[str, str], opened: bool = False):
        self.opening, self.closing = tags
        self.state = _THINK if opened else _START
        self.held = ""
        self.started = False  # thoughts: a non-whitespace character was sent

    def push(self, text: str) -> tuple[str, str]:
        """Take the next piece of the answer; return the (thoughts, answer) text settled by it."""
        self.held += text
        thoughts, answer = [], []
        while True:
            if self.state == _START:
                body = self.held.lstrip()
                if body.startswith(self.opening):
                    self.held, self.state = body[len(self.opening):], _THINK
                    continue
                if self.opening.startswith(body):  # whitespace, or the start of the tag so far
                    break
                self.state = _ANSWER
                continue
            if self.state == _THINK:
                if not self.started:
                    self.held = self.held.lstrip()
                end = self.held.find(self.closing)
                if end >= 0:
                    thoughts.append(self.held[:end].rstrip())
                    self.held, self.state = self.held[end + len(self.closing):], _AFTER
                    continue
                keep = len(self.held) - _partial_suffix(self.held, self.closing)
                settled = self.held[:keep].rstrip()
                if settled:
                    self.started = True
                thoughts.append(settled)
                self.held = self.held[len(settled):]
                break
            if self.state == _AFTER:
                self.held = self.held.lstrip()
                if self.held:
                    self.state = _ANSWER
                    continue
                break
            answer.append(self.held)
            self.held = ""
            break
        return "".join(thoughts), "".join(answer)

    def flush(self) -> tuple[str, str]:
        """The end of the answer: whatever is still held, as (thoughts, answer)."""
        held, self.held = self.held, ""
        if self.state == _THINK:
            return held.rstrip(), ""
        if self.state == _START:  # only whitespace or a beginning of the opening tag came: an answer
            self.state = _ANSWER
            return "", held
        return "", held if self.state == _ANSWER else ""

    def split(self, text: str) -> tuple[str, str]:
        """A whole answer at once."""
        a, b = self.push(text)
        c, d = self.flush()
        return a + c, b + d
