"""Dialogs: the message types, the `ChatFormat` protocol, and the one door for untrusted messages.

Untrusted strings enter a chat format in one place: `check_messages` (a known role, JSON-like values
only, through `plain`), used by every format (chat.py's built-in ones, chat_template.py's Jinja one).
No model, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, TypedDict

from llamaforge.errors import ChatFormatError
from llamaforge.tokenizer import Tokenizer
from llamaforge.tokenizers.backends import THINK_TAGS

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    """One chat message, as in Meta's `generation.py`."""

    role: Role
    content: str


Dialog = list[Message]


class ChatFormat(Protocol):
    """How a model wants a dialog turned into a prompt."""

    name: str
    stop_ids: frozenset[int]
    think_tags: tuple[str, str] | None  # the tags around the model's thoughts, if it has a thinking mode

    def encode_dialog(self, dialog: Sequence[Mapping[str, Any]]) -> list[int]:
        """The prompt ids, ending where the assistant's answer begins."""
        ...

    def render(self, dialog: Sequence[Mapping[str, Any]]) -> str:
        """The prompt as text, for display and debugging."""
        ...


# Roles each format knows. A role reaches the prompt as text (a header, a template branch), so it is
# never free text: anything else is refused.
LLAMA2_ROLES = frozenset({"system", "user", "assistant"})
LLAMA3_ROLES = frozenset({"system", "user", "assistant", "ipython", "tool"})
TEMPLATE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "ipython", "function"})
MAX_DEPTH = 32  # nesting of a message's values (tool-call arguments are JSON objects)


def plain(value: Any, where: str, depth: int = 0) -> Any:
    """A deep copy of a JSON-like value (str, number, bool, None, lists, str-keyed mappings), or a ChatFormatError.

    Anything else (an object whose str() a template would print, bytes, a set) is refused: only data
    reaches a template.
    """
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if depth >= MAX_DEPTH:
        raise ChatFormatError(f"{where} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ChatFormatError(f"{where} has a key {k!r} that is not a string")
            out[k] = plain(v, f"{where}[{k!r}]", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    raise ChatFormatError(f"{where} is a {type(value).__name__}; message values must be JSON-like "
                          "(str, number, bool, None, list, dict)")


def check_messages(
    dialog: Sequence[Mapping[str, Any]], roles: frozenset[str], *, need_str_content: bool = True
) -> list[dict[str, Any]]:
    """The one door for messages: a list of plain dicts with a known role and JSON-like values.

    Raises:
        ChatFormatError: not a list of mappings, an unknown role, a non-str content where the format
            needs one, or a value that is not JSON-like.
    """
    if isinstance(dialog, (str, bytes)) or not isinstance(dialog, Sequence):
        raise ChatFormatError(f"a dialog is a list of messages, got {type(dialog).__name__}")
    out = []
    for i, msg in enumerate(dialog):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str):
            raise ChatFormatError(f"message {i} must be a mapping with a str 'role', got {msg!r:.80}")
        if msg["role"] not in roles:
            raise ChatFormatError(
                f"message {i} has role {msg['role']!r:.40}; this chat format knows the roles {sorted(roles)}"
            )
        if need_str_content and not isinstance(msg.get("content"), str):
            got = type(msg.get("content")).__name__
            raise ChatFormatError(f"message {i} ({msg['role']}) must have a str 'content', got {got}")
        out.append(plain(msg, f"message {i}"))
    return out


def piece(tokenizer: Tokenizer, token_id: int | None) -> str:
    """A token's text as a format writes it (BOS / EOS pieces), "" for a vocabulary without that token."""
    return tokenizer.id_to_piece(token_id) if token_id is not None else ""


def think_tags(tokenizer: Tokenizer, templates: Sequence[str] = ()) -> tuple[str, str] | None:
    """`THINK_TAGS` when a model has a thinking mode, else None, told from its files, never its name: both tags
    are tokens of its vocabulary (Qwen3, DeepSeek-R1), or a chat template of it writes or strips `</think>` or
    switches thinking (`enable_thinking`)."""
    opening, closing = THINK_TAGS
    if opening in tokenizer.special_tokens and closing in tokenizer.special_tokens:
        return THINK_TAGS
    if any(closing in t or "enable_thinking" in t for t in templates):
        return THINK_TAGS
    return None
