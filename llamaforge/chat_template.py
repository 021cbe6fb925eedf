"""The Jinja chat format: a model's own `chat_template` (GGUF metadata or tokenizer_config.json), rendered
the way transformers' `apply_chat_template` renders it, in a bounded sandbox (chat_sandbox.py), with the
compile mark (`chat_sandbox.compiled_before`) that spares jinja2 at build for a template seen before.
Special tokens the *template* writes become control ids; text from the caller never does.

Every message goes through the one door (chat_dialog.check_messages), and every string the caller gave
(content, name, tool names, descriptions and parameters, tool-call arguments, any extra field, dict keys;
in messages and in `tools`) is replaced by a numbered sentinel for a second rendering (`_mark`), which
tells where in the prompt each landed; special-token strings are only looked for outside those places.
Only the role (one of a fixed set) and short identifier-like strings holding no special token are left
as they are.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from llamaforge import chat_sandbox
from llamaforge.chat_dialog import TEMPLATE_ROLES, check_messages, piece, plain, think_tags
from llamaforge.errors import ChatFormatError
from llamaforge.tokenizer import Tokenizer
from llamaforge.tokenizers.backends import special_splitter


# Printable brackets (so `repr` and `tojson` keep them as they are) that templates do not write; a
# caller's text never reaches the sentinel rendering except as identifiers, so it cannot forge one.
_SENTINEL = re.compile("\u2983([0-9]+)\u2984")


def _sentinel(i: int) -> str:
    return f"\u2983{i}\u2984"


class JinjaChatFormat:
    """A model's Jinja chat template, rendered in a sandbox and tokenized without trusting message text."""

    name = "jinja"

    def __init__(self, tokenizer: Tokenizer, template: str, origin: str | None = None,
                 named: Mapping[str, str] | None = None) -> None:
        """`origin` names where the template came from in error messages (default: the tokenizer's source);
        `named`: the model's other templates by name (tokenizer_config.json's list, GGUF's
        `tokenizer.chat_template.NAME`), of which "tool_use" renders requests with tools."""
        self.origin = origin or f"the chat template of {tokenizer.source or 'the tokenizer'}"
        if not isinstance(template, str) or not template.strip():
            raise ChatFormatError(f"{self.origin} is empty")
        self.template = template
        self.templates: dict[str, str] = {**{k: v for k, v in (named or {}).items() if k != "default"},
                                          "default": template}
        # A template that compiled before (a mark in the cache folder, chat_sandbox.compiled_before) compiles at
        # its first render; any other compiles now, so a broken one is a ChatFormatError here, at build.
        self._compiled: dict[str, Any] = {}
        for name, text in self.templates.items():
            if not isinstance(text, str) or not text.strip():
                raise ChatFormatError(f"{self._origin(name)} is empty")
            if not chat_sandbox.compiled_before(text):
                self._compile(name)
                chat_sandbox.remember_compiled(text)
        self.tokenizer = tokenizer
        self.stop_ids: frozenset[int] = tokenizer.stop_ids
        self._specials = special_splitter(tokenizer.special_tokens)
        self.think_tags = think_tags(tokenizer, list(self.templates.values()))
        # where the tags are control tokens, a caller's "</think>" in an answer of the history stays text, so a
        # template that splits the thoughts off the content itself (Qwen3's, DeepSeek-R1's) could not be traced
        self._split_history = self.think_tags is not None and self.think_tags[1] in tokenizer.special_tokens and \
            any(self.think_tags[1] in t for t in self.templates.values())

    def _origin(self, name: str) -> str:
        return self.origin if name == "default" else f"{self.origin} (its template {name!r})"

    def template_name(self, tools: Any) -> str:
        """The template a request renders with, by transformers' rule (`get_chat_template`): "tool_use" when
        tools are given (a list, even empty) and the model has one, else the default."""
        return "tool_use" if tools is not None and "tool_use" in self.templates else "default"

    def template_for(self, tools: Any) -> str:
        """The text of the template a request with these tools renders with (see `template_name`)."""
        return self.templates[self.template_name(tools)]

    def _compile(self, name: str = "default") -> Any:
        if name not in self._compiled:  # two threads compiling at once make two equal templates: harmless
            try:
                self._compiled[name] = chat_sandbox.environment().from_string(self.templates[name])
            except Exception as e:  # noqa: BLE001 - a syntax error, or a parser recursion on hostile nesting
                raise ChatFormatError(f"{self._origin(name)} does not compile: {type(e).__name__}: {e}") from e
        return self._compiled[name]

    def _render(self, messages: list[dict[str, Any]], tools: list[Any] | None, add_generation_prompt: bool,
                variables: Mapping[str, Any] | None = None) -> str:
        tok = self.tokenizer
        context: dict[str, Any] = {
            **(variables or {}),
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": piece(tok, tok.bos_id),
            "eos_token": piece(tok, tok.eos_id),
        }
        if tools is not None:
            context["tools"] = tools
        name = self.template_name(tools)
        return chat_sandbox.render(self._compile(name), context, self._origin(name))

    def render(
        self, dialog: Sequence[Mapping[str, Any]], tools: list[Any] | None = None, add_generation_prompt: bool = True,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text the template renders (as transformers' `apply_chat_template(tokenize=False,
        **variables)`)."""
        messages, tools = _check_dialog(dialog, tools)
        return self._render(self._thoughts_apart(messages), tools, add_generation_prompt, _check_variables(variables))

    def encode_dialog(
        self, dialog: Sequence[Mapping[str, Any]], tools: list[Any] | None = None, add_generation_prompt: bool = True,
        variables: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """The prompt ids: template special tokens as control ids, message contents as plain text.

        `variables` are extra template variables, as transformers' `apply_chat_template(**kwargs)` passes them
        (Qwen3's `enable_thinking`): names of letters, digits and '_', values booleans, numbers or None (no
        text, which could not be traced).

        Raises:
            ChatFormatError: the template fails, or it transforms a message content that holds a
                special-token string in a way that cannot be traced (that string would otherwise
                become a control token).
        """
        messages, tools = _check_dialog(dialog, tools)
        messages = self._thoughts_apart(messages)
        variables = _check_variables(variables)
        text = self._render(messages, tools, add_generation_prompt, variables)
        contents: dict[int, str] = {}
        marked = _mark(messages, contents, self._specials)
        marked_tools = _mark(tools, contents, self._specials) if tools is not None else None
        try:
            skeleton: str | None = self._render(marked, marked_tools, add_generation_prompt, variables)
        except ChatFormatError:
            skeleton = None
        ids = self._encode_traced(text, skeleton, contents) if skeleton is not None else None
        if ids is None:
            self._check_untraced(text, skeleton, contents)
            ids = self.tokenizer.encode(text, allow_special=True)
        tok = self.tokenizer
        if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids.insert(0, tok.bos_id)
        return ids

    def _thoughts_apart(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """An assistant answer of the history that holds its thoughts (`<think>...</think>answer`, as a client sends
        a whole earlier answer back) and no `reasoning_content`: the thoughts moved to `reasoning_content`, split
        exactly as Qwen3's template splits them itself (text before `</think>` after the last `<think>`, and the
        text after it, newlines trimmed), for a template that splits them itself (it holds `</think>`). Templates
        that read `reasoning_content` (Qwen3's) render the same prompt, those that drop the thoughts (DeepSeek-R1's)
        the same but for newlines after `</think>`; the caller's text is then traced as two strings instead of one
        the template rewrites. Other templates get the answer as it is (its tags stay text)."""
        if not self._split_history:
            return messages
        opening, closing = self.think_tags  # type: ignore[misc]
        out = []
        for m in messages:
            content = m.get("content")
            if m.get("role") == "assistant" and isinstance(content, str) and closing in content \
                    and m.get("reasoning_content") is None:
                m = {**m, "content": content.split(closing)[-1].lstrip("\n"),
                     "reasoning_content": content.split(closing)[0].rstrip("\n").split(opening)[-1].lstrip("\n")}
            out.append(m)
        return out

    def _check_untraced(self, text: str, skeleton: str | None, contents: dict[int, str]) -> None:
        """Before encoding a prompt whose caller strings could not be located: refuse if any could be a token."""
        if self._specials is None:
            return
        if any(self._specials.search(c) for c in contents.values()):
            raise ChatFormatError(
                f"a message or tool holds special-token text and {self.origin} transforms it in a way "
                "llamaforge cannot trace; refusing to turn caller text into control tokens"
            )
        # caller strings that each hold none could still form one together: the prompt may hold no
        # special token the rendering with sentinels lacks
        if skeleton is not None:
            have = Counter(m.group() for m in self._specials.finditer(text))
            allowed = Counter(m.group() for m in self._specials.finditer(skeleton))
            if have - allowed:
                raise ChatFormatError(
                    f"the dialog's text forms special tokens {sorted(have - allowed)} in {self.origin}'s "
                    "output; refusing to turn caller text into control tokens"
                )

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


def _check_dialog(dialog: Sequence[Mapping[str, Any]], tools: Any) -> tuple[list[dict[str, Any]], Any]:
    """Messages and tools for a template, both through the one door."""
    messages = check_messages(dialog, TEMPLATE_ROLES, need_str_content=False)
    if tools is not None:
        if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
            raise ChatFormatError(f"tools must be a list of tool descriptions, got {type(tools).__name__}")
        tools = plain(list(tools), "tools")
    return messages, tools


_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_RESERVED = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "raise_exception",
             "strftime_now", "namespace", "range", "dict", "lipsum", "cycler", "joiner"}


def _check_variables(variables: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Extra template variables from a caller: identifier names that are not the template's own, scalar
    non-text values (a caller's text there would reach the prompt untraced)."""
    if variables is None:
        return None
    if not isinstance(variables, Mapping):
        raise ChatFormatError(f"template variables must be a mapping, got {type(variables).__name__}")
    if len(variables) > 64:
        raise ChatFormatError(f"at most 64 template variables, got {len(variables)}")
    out = {}
    for name, value in variables.items():
        if not isinstance(name, str) or not _VARIABLE.fullmatch(name) or name in _RESERVED:
            raise ChatFormatError(f"template variable {name!r} is not allowed (a name of letters, digits and '_' "
                                  f"other than {', '.join(sorted(_RESERVED))})")
        if value is not None and not isinstance(value, (bool, int, float)):
            raise ChatFormatError(f"template variable {name!r} must be true, false, a number or null, "
                                  f"got {type(value).__name__}")
        out[name] = value
    return out


# A caller's string left as it is in the sentinel rendering: short identifier-like text (a tool type,
# a function or parameter name, "object") that templates compare against. It cannot hold a special
# token (checked too), and since everything else is a sentinel, no token can span it.
_IDENTIFIER = re.compile(r"[A-Za-z0-9_.\-]{0,64}")


def _mark(value: Any, texts: dict[int, str], specials: Any, key: str | None = None) -> Any:
    """A copy of a checked message list (or tools) with each caller string replaced by a numbered sentinel.

    The replaced strings are kept in `texts`. The `role` of a message stays (a fixed set, see
    `_check_messages`), as do identifier-like strings without special-token text.
    """

    def mark(s: str) -> str:
        if _IDENTIFIER.fullmatch(s) and not (specials is not None and specials.search(s)):
            return s
        texts[len(texts)] = s
        return _sentinel(len(texts) - 1)

    if isinstance(value, str):
        return value if key == "role" else mark(value)
    if isinstance(value, dict):
        return {mark(k): _mark(v, texts, specials, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_mark(v, texts, specials) for v in value]
    return value


def _candidates(content: str) -> list[str]:
    """How a template may write a string: as is, trimmed, inside JSON (`tojson`) or a printed list (repr)."""
    out = []
    forms = (content, content.strip(), content.lstrip(), content.rstrip(),
             json.dumps(content, ensure_ascii=False)[1:-1], repr(content)[1:-1])
    for c in forms:
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
