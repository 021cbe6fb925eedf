"""Chat formats: a dialog of messages in, the prompt's token ids out (no model, no torch).

- `Llama2ChatFormat`: Meta Llama 2's `chat_completion` encoding (github meta-llama/llama,
  `llama/generation.py`): an optional system message folded into the first user message between
  `<<SYS>>` markers, each finished exchange `[INST] user [/INST] answer ` with BOS and EOS, the last
  `[INST] user [/INST]` with BOS only.
- `Llama3ChatFormat`: Meta llama3's `ChatFormat.encode_dialog_prompt` (header tokens, "\\n\\n",
  stripped content, `<|eot_id|>`, and an open assistant header at the end).
- `JinjaChatFormat`: a model's own Jinja `chat_template` (GGUF metadata or tokenizer_config.json),
  rendered in jinja2's immutable sandbox the way transformers' `apply_chat_template` renders it.
  Special tokens the *template* writes become control ids; text inside message contents never
  does: the template is rendered a second time with each content replaced by a private-use
  sentinel, which tells where in the prompt each content landed, and special-token strings are
  only looked for outside those places.

`chat_format_for(tokenizer)` picks one: a chat template wins, then Llama 3 header tokens, else Llama 2.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, Protocol, TypedDict

from llamaforge.errors import ChatFormatError
from llamaforge.tokenizer import Tokenizer
from llamaforge.tokenizers.backends import special_splitter

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    """One chat message, as in Meta's `generation.py`."""

    role: Role
    content: str


Dialog = list[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def has_special_tags(dialog: Sequence[Mapping[str, Any]]) -> bool:
    """Meta Llama 2's unsafe-request check: does any message contain [INST], [/INST], <<SYS>> or <</SYS>>?"""
    return any(tag in str(msg.get("content", "")) for tag in SPECIAL_TAGS for msg in dialog)


class ChatFormat(Protocol):
    """How a model wants a dialog turned into a prompt."""

    name: str
    stop_ids: frozenset[int]

    def encode_dialog(self, dialog: Sequence[Mapping[str, Any]]) -> list[int]:
        """The prompt ids, ending where the assistant's answer begins."""
        ...

    def render(self, dialog: Sequence[Mapping[str, Any]]) -> str:
        """The prompt as text, for display and debugging."""
        ...


def _check_messages(dialog: Sequence[Mapping[str, Any]], *, need_str_content: bool = True) -> list[dict[str, Any]]:
    if isinstance(dialog, (str, bytes)) or not isinstance(dialog, Sequence):
        raise ChatFormatError(f"a dialog is a list of messages, got {type(dialog).__name__}")
    out = []
    for i, msg in enumerate(dialog):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str):
            raise ChatFormatError(f"message {i} must be a mapping with a str 'role', got {msg!r}")
        if need_str_content and not isinstance(msg.get("content"), str):
            got = type(msg.get("content")).__name__
            raise ChatFormatError(f"message {i} ({msg['role']}) must have a str 'content', got {got}")
        out.append(dict(msg))
    return out


def _piece(tokenizer: Tokenizer, token_id: int | None) -> str:
    return tokenizer.id_to_piece(token_id) if token_id is not None else ""


# --------------------------------------------------------------------------- Llama 2


class Llama2ChatFormat:
    """Meta Llama 2 chat: `[INST]`/`[/INST]` turns, `<<SYS>>` system prompt, BOS/EOS per exchange."""

    name = "llama2"

    def __init__(self, tokenizer: Tokenizer) -> None:
        if tokenizer.bos_id is None or tokenizer.eos_id is None:
            raise ChatFormatError("the Llama 2 chat format needs a vocabulary with BOS and EOS tokens")
        self.tokenizer = tokenizer
        self.stop_ids: frozenset[int] = tokenizer.stop_ids | {tokenizer.eos_id}

    def turns(self, dialog: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[str, str]], str]:
        """Fold the system message and check the roles: `([(user, answer), ...], last_user)`.

        Raises:
            ChatFormatError: roles not system?, user, assistant, user, ... ending with user.
        """
        msgs = _check_messages(dialog)
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
        bos, eos = _piece(self.tokenizer, self.tokenizer.bos_id), _piece(self.tokenizer, self.tokenizer.eos_id)
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

    def encode_header(self, role: str) -> list[int]:
        """`<|start_header_id|>` role `<|end_header_id|>` "\\n\\n"."""
        sp, enc = self.tokenizer.special_tokens, self.tokenizer.encode
        return [sp["<|start_header_id|>"], *enc(role), sp["<|end_header_id|>"], *enc("\n\n")]

    def encode_dialog(self, dialog: Sequence[Mapping[str, Any]]) -> list[int]:
        """Exactly Meta llama3's `ChatFormat.encode_dialog_prompt`."""
        sp = self.tokenizer.special_tokens
        ids = [sp["<|begin_of_text|>"]]
        for msg in _check_messages(dialog):
            ids += self.encode_header(msg["role"])
            ids += self.tokenizer.encode(msg["content"].strip())
            ids.append(sp["<|eot_id|>"])
        return ids + self.encode_header("assistant")

    def render(self, dialog: Sequence[Mapping[str, Any]]) -> str:
        """The same prompt as text."""
        turns = "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
            for m in _check_messages(dialog)
        )
        return f"<|begin_of_text|>{turns}<|start_header_id|>assistant<|end_header_id|>\n\n"


# --------------------------------------------------------------------------- Jinja templates

_SENTINEL = re.compile("\U000f0000([0-9]+)\U000f0001")


def _sentinel(i: int) -> str:
    return f"\U000f0000{i}\U000f0001"


def _environment() -> Any:
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

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


class JinjaChatFormat:
    """A model's Jinja chat template, rendered in a sandbox and tokenized without trusting message text."""

    name = "jinja"

    def __init__(self, tokenizer: Tokenizer, template: str) -> None:
        import jinja2

        if not isinstance(template, str) or not template.strip():
            raise ChatFormatError("the chat template is empty")
        try:
            self._template = _environment().from_string(template)
        except jinja2.TemplateError as e:
            raise ChatFormatError(f"the model's chat template does not compile: {e}") from e
        self.tokenizer = tokenizer
        self.template = template
        self.stop_ids: frozenset[int] = tokenizer.stop_ids
        self._specials = special_splitter(tokenizer.special_tokens)

    def _render(self, messages: list[dict[str, Any]], tools: list[Any] | None, add_generation_prompt: bool) -> str:
        import jinja2

        tok = self.tokenizer
        context: dict[str, Any] = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": _piece(tok, tok.bos_id),
            "eos_token": _piece(tok, tok.eos_id),
        }
        if tools is not None:
            context["tools"] = tools
        try:
            return self._template.render(**context)
        except jinja2.TemplateError as e:
            raise ChatFormatError(f"the model's chat template rejected the dialog: {e}") from e

    def render(
        self, dialog: Sequence[Mapping[str, Any]], tools: list[Any] | None = None, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text the template renders (as transformers' `apply_chat_template(tokenize=False)`)."""
        return self._render(_check_messages(dialog, need_str_content=False), tools, add_generation_prompt)

    def encode_dialog(
        self, dialog: Sequence[Mapping[str, Any]], tools: list[Any] | None = None, add_generation_prompt: bool = True
    ) -> list[int]:
        """The prompt ids: template special tokens as control ids, message contents as plain text.

        Raises:
            ChatFormatError: the template fails, or it transforms a message content that holds a
                special-token string in a way that cannot be traced (that string would otherwise
                become a control token).
        """
        messages = _check_messages(dialog, need_str_content=False)
        text = self._render(messages, tools, add_generation_prompt)
        contents: dict[int, str] = {}
        marked = [_mark(m, contents) for m in messages]
        try:
            skeleton: str | None = self._render(marked, tools, add_generation_prompt)
        except ChatFormatError:
            skeleton = None
        ids = self._encode_traced(text, skeleton, contents) if skeleton is not None else None
        if ids is None:
            unsafe = any(self._specials is not None and self._specials.search(c) for c in contents.values())
            if unsafe:
                raise ChatFormatError(
                    "a message contains special-token text and the chat template transforms message "
                    "content in a way llamaforge cannot trace; refusing to turn user text into control tokens"
                )
            ids = self.tokenizer.encode(text, allow_special=True)
        tok = self.tokenizer
        if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids.insert(0, tok.bos_id)
        return ids

    def _encode_traced(self, text: str, skeleton: str, contents: dict[int, str]) -> list[int] | None:
        parts = _SENTINEL.split(skeleton)
        fixed, slots = parts[0::2], [int(s) for s in parts[1::2]]
        if any(s not in contents for s in slots):
            return None
        spans = _locate(text, fixed, [contents[s] for s in slots])
        if spans is None:
            return None
        # template regions: the text outside every content span
        regions, pos = [], 0
        for start, end in spans:
            regions.append((pos, start))
            pos = end
        regions.append((pos, len(text)))
        found = [
            m for a, b in regions if self._specials is not None for m in self._specials.finditer(text, a, b)
        ]
        # the template's own special tokens, counted in the sentinel rendering: a located content
        # must not have smuggled any more in
        expected = Counter(m.group() for f in fixed if self._specials is not None for m in self._specials.finditer(f))
        if Counter(m.group() for m in found) != expected:
            return None
        ids: list[int] = []
        pos = 0
        for m in found:
            if m.start() > pos:
                ids += self.tokenizer.encode(text[pos : m.start()])
            ids.append(self.tokenizer.special_tokens[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self.tokenizer.encode(text[pos:])
        return ids


# message fields whose text is the user's (or the model's), never the template's
_TEXT_FIELDS = ("content", "reasoning_content", "thinking")


def _mark(message: dict[str, Any], texts: dict[int, str]) -> dict[str, Any]:
    """A copy of `message` with each user-supplied text replaced by a numbered sentinel (kept in `texts`)."""

    def sentinel(value: str) -> str:
        texts[len(texts)] = value
        return _sentinel(len(texts) - 1)

    out = dict(message)
    for key in _TEXT_FIELDS:
        value = out.get(key)
        if isinstance(value, str):
            out[key] = sentinel(value)
        elif key == "content" and isinstance(value, list):  # multimodal parts: [{"type": "text", "text": ...}]
            out[key] = [
                dict(part, text=sentinel(part["text"]))
                if isinstance(part, Mapping) and isinstance(part.get("text"), str)
                else part
                for part in value
            ]
    return out


def _candidates(content: str) -> list[str]:
    out = []
    for c in (content, content.strip(), content.lstrip(), content.rstrip()):
        if c not in out:
            out.append(c)
    return out


def _locate(text: str, fixed: list[str], contents: list[str]) -> list[tuple[int, int]] | None:
    """Where each content landed in `text`, given the template text around them (`fixed`).

    Each content must appear as written or stripped (what templates do with `| trim`), followed by
    the next template part. Anything else (a template that rewrites contents) gives None: guessing
    where a rewritten content ends could let text inside it pass for the template's own tokens.
    """
    if not text.startswith(fixed[0]):
        return None
    spans, pos = [], len(fixed[0])
    for k, content in enumerate(contents):
        nxt, last = fixed[k + 1], k == len(contents) - 1
        for cand in _candidates(content):
            end = pos + len(cand)
            if text.startswith(cand, pos) and text.startswith(nxt, end) and (not last or end + len(nxt) == len(text)):
                break
        else:
            return None
        spans.append((pos, end))
        pos = end + len(nxt)
    return spans if pos == len(text) else None


# --------------------------------------------------------------------------- choosing a format


def chat_format_for(tokenizer: Tokenizer, template: str | None = None) -> ChatFormat:
    """The chat format a tokenizer's model uses.

    A chat template (given, or the tokenizer's own) wins; else Llama 3 header tokens mean Llama 3;
    else Llama 2.
    """
    template = template or tokenizer.chat_template
    if template:
        return JinjaChatFormat(tokenizer, template)
    if all(t in tokenizer.special_tokens for t in LLAMA3_TOKENS):
        return Llama3ChatFormat(tokenizer)
    return Llama2ChatFormat(tokenizer)


def render_prompt(tokenizer: Tokenizer, dialog: Sequence[Mapping[str, Any]], template: str | None = None) -> str:
    """The prompt text `chat_format_for(tokenizer, template)` would encode, for display/debugging."""
    return chat_format_for(tokenizer, template).render(dialog)
