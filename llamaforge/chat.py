"""Chat formats: which one a model gets, and the built-in ones (no model, no torch).

- `Llama2ChatFormat`: Meta Llama 2's `chat_completion` encoding (github meta-llama/llama,
  `llama/generation.py`): an optional system message folded into the first user message between
  `<<SYS>>` markers, each finished exchange `[INST] user [/INST] answer ` with BOS and EOS, the last
  `[INST] user [/INST]` with BOS only.
- `Llama3ChatFormat`: Meta llama3's `ChatFormat.encode_dialog_prompt` (header tokens, "\\n\\n",
  stripped content, `<|eot_id|>`, and an open assistant header at the end).
- `JinjaChatFormat` (chat_template.py): a model's own Jinja `chat_template`, rendered in a bounded sandbox,
  caller text traced so that it never becomes control tokens.

Messages enter every format through one door (chat_dialog.py: `check_messages`).

`chat_format_for(tokenizer)` picks one: a chat template wins, then Llama 3 header tokens, else Llama 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llamaforge.chat_dialog import (LLAMA2_ROLES, LLAMA3_ROLES, ChatFormat, Dialog, Message, check_messages, piece,
                                    think_tags)
from llamaforge.chat_template import JinjaChatFormat
from llamaforge.errors import ChatFormatError
from llamaforge.tokenizer import Tokenizer

__all__ = ["UNSAFE_ERROR", "ChatFormat", "Dialog", "JinjaChatFormat", "Llama2ChatFormat", "Llama3ChatFormat",
           "Message", "chat_format_for", "has_special_tags", "render_prompt"]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def has_special_tags(dialog: Sequence[Mapping[str, Any]]) -> bool:
    """Meta Llama 2's unsafe-request check: does any message contain [INST], [/INST], <<SYS>> or <</SYS>>?"""
    return any(tag in str(msg.get("content", "")) for tag in SPECIAL_TAGS for msg in dialog)


# --------------------------------------------------------------------------- Llama 2


class Llama2ChatFormat:
    """Meta Llama 2 chat: `[INST]`/`[/INST]` turns, `<<SYS>>` system prompt, BOS/EOS per exchange."""

    name = "llama2"

    def __init__(self, tokenizer: Tokenizer) -> None:
        if tokenizer.bos_id is None or tokenizer.eos_id is None:
            raise ChatFormatError("the Llama 2 chat format needs a vocabulary with BOS and EOS tokens")
        self.tokenizer = tokenizer
        self.stop_ids: frozenset[int] = tokenizer.stop_ids | {tokenizer.eos_id}
        self.think_tags = think_tags(tokenizer)

    def turns(self, dialog: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[str, str]], str]:
        """Fold the system message and check the roles: `([(user, answer), ...], last_user)`.

        Raises:
            ChatFormatError: roles not system?, user, assistant, user, ... ending with user.
        """
        msgs = check_messages(dialog, LLAMA2_ROLES)
        if not msgs:
            raise ChatFormatError("the dialog is empty; it needs at least one 'user' message")
        offset = 0
        if msgs[0]["role"] == "system":
            if len(msgs) < 2:
                raise ChatFormatError("the dialog has only a system message; add a 'user' message after it")
            folded = {"role": msgs[1]["role"], "content": B_SYS + msgs[0]["content"] + E_SYS + msgs[1]["content"]}
            msgs = [folded] + msgs[2:]
            offset = 1
        for i, msg in enumerate(msgs):
            expected = "user" if i % 2 == 0 else "assistant"
            if msg["role"] != expected:
                raise ChatFormatError(
                    f"message {i + offset} has role {msg['role']!r} where {expected!r} was expected: the Llama 2 "
                    "chat format takes an optional 'system' message first, then 'user' and 'assistant' "
                    "alternating (u/a/u/a/u...), ending with 'user'"
                )
        if msgs[-1]["role"] != "user":
            raise ChatFormatError(f"the last message must be from 'user', got {msgs[-1]['role']!r}")
        pairs = [(u["content"], a["content"]) for u, a in zip(msgs[::2], msgs[1::2])]
        return pairs, msgs[-1]["content"]

    def encode_dialog(self, dialog: Sequence[Mapping[str, Any]]) -> list[int]:
        """Exactly Meta Llama 2's `chat_completion` prompt tokens."""
        pairs, last = self.turns(dialog)
        enc = self.tokenizer.encode
        ids: list[int] = []
        for user, answer in pairs:
            ids += enc(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ", bos=True, eos=True)
        ids += enc(f"{B_INST} {last.strip()} {E_INST}", bos=True, eos=False)
        return ids

    def render(self, dialog: Sequence[Mapping[str, Any]]) -> str:
        """The same prompt as text, BOS/EOS written as their pieces ("<s>", "</s>")."""
        pairs, last = self.turns(dialog)
        bos, eos = piece(self.tokenizer, self.tokenizer.bos_id), piece(self.tokenizer, self.tokenizer.eos_id)
        text = "".join(f"{bos}{B_INST} {u.strip()} {E_INST} {a.strip()} {eos}" for u, a in pairs)
        return text + f"{bos}{B_INST} {last.strip()} {E_INST}"


# --------------------------------------------------------------------------- Llama 3

LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


class Llama3ChatFormat:
    """Meta Llama 3 chat: `<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>` turns."""

    name = "llama3"

    def __init__(self, tokenizer: Tokenizer) -> None:
        missing = [t for t in LLAMA3_TOKENS if t not in tokenizer.special_tokens]
        if missing:
            raise ChatFormatError(f"the Llama 3 chat format needs the special tokens {missing}, which this vocabulary lacks")
        self.tokenizer = tokenizer
        sp = tokenizer.special_tokens
        stops = {sp["<|eot_id|>"]} | ({sp["<|end_of_text|>"]} if "<|end_of_text|>" in sp else set())
        self.stop_ids: frozenset[int] = tokenizer.stop_ids | stops
        self.think_tags = think_tags(tokenizer)

    def encode_header(self, role: str) -> list[int]:
        """`<|start_header_id|>` role `<|end_header_id|>` "\\n\\n"."""
        sp, enc = self.tokenizer.special_tokens, self.tokenizer.encode
        return [sp["<|start_header_id|>"], *enc(role), sp["<|end_header_id|>"], *enc("\n\n")]

    def encode_dialog(self, dialog: Sequence[Mapping[str, Any]]) -> list[int]:
        """Exactly Meta llama3's `ChatFormat.encode_dialog_prompt`."""
        sp = self.tokenizer.special_tokens
        ids = [sp["<|begin_of_text|>"]]
        for msg in check_messages(dialog, LLAMA3_ROLES):
            ids += self.encode_header(msg["role"])
            ids += self.tokenizer.encode(msg["content"].strip())
            ids.append(sp["<|eot_id|>"])
        return ids + self.encode_header("assistant")

    def render(self, dialog: Sequence[Mapping[str, Any]]) -> str:
        """The same prompt as text."""
        turns = "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
            for m in check_messages(dialog, LLAMA3_ROLES)
        )
        return f"<|begin_of_text|>{turns}<|start_header_id|>assistant<|end_header_id|>\n\n"



# --------------------------------------------------------------------------- choosing a format


def chat_format_for(tokenizer: Tokenizer, template: str | None = None) -> ChatFormat:
    """The chat format a tokenizer's model uses.

    A chat template (given, or the tokenizer's own) wins; else Llama 3 header tokens mean Llama 3;
    else Llama 2.
    """
    if template:
        return JinjaChatFormat(tokenizer, template, origin="the chat template given")
    if tokenizer.chat_template:
        return JinjaChatFormat(tokenizer, tokenizer.chat_template, named=tokenizer.chat_templates)
    if all(t in tokenizer.special_tokens for t in LLAMA3_TOKENS):
        return Llama3ChatFormat(tokenizer)
    return Llama2ChatFormat(tokenizer)


def render_prompt(tokenizer: Tokenizer, dialog: Sequence[Mapping[str, Any]], template: str | None = None) -> str:
    """The prompt text `chat_format_for(tokenizer, template)` would encode, for display/debugging."""
    return chat_format_for(tokenizer, template).render(dialog)
