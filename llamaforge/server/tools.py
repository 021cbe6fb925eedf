"""Function calling: OpenAI `tools` / `tool_choice` through the model's chat template.

A chat template that knows about tools (it mentions `tools`) is rendered with them, and tool calls and
results in the history are passed as the template expects them (Hugging Face's convention). A template
that does not gets the common Hermes/Qwen convention written into the system message: the tools as
JSON inside <tools></tools>, calls as <tool_call>{"name": ..., "arguments": {...}}</tool_call>, and
tool results as <tool_response></tool_response> in a user turn.

The answer is parsed back into `tool_calls`: every <tool_call>...</tool_call> block, or else an answer
that is just a JSON object with "name" and "arguments" (or Llama 3.1's "parameters"), or a JSON list of
them (Mistral's, after its [TOOL_CALLS] token), or Mistral-Small-3's `[TOOL_CALLS]name[ARGS]{...}` calls.
Call ids are 9 alphanumeric characters, the form Mistral's templates require of the ids a client sends
back (OpenAI's clients treat them as opaque). When
`tool_choice` is "required" or names a function, decoding is constrained to such a JSON object (see
`forced_call_schema`), so the call is well-formed JSON with arguments matching the function's schema.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any, Optional

MISTRAL_CALLS = "[TOOL_CALLS]"
# Mistral-Small-3 / Devstral (tokenizer v11+): [TOOL_CALLS]name[CALL_ID]id[ARGS]{...}, the call id optional
MISTRAL_NAMED_RE = re.compile(r"\[TOOL_CALLS\]\s*([A-Za-z0-9_.\-]+)\s*(?:\[CALL_ID\]\s*[A-Za-z0-9]*\s*)?\[ARGS\]\s*")
TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

HERMES_SYSTEM = (
    "You can call functions to help answer. The functions are described as JSON schemas within "
    "<tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with a JSON object of the function's name and arguments within "
    "<tool_call></tool_call> tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
    "</tool_call>"
)


def request_template(chat_format: Any, tools: Optional[list]) -> Optional[str]:
    """The Jinja template a request with these tools (None: none) renders with: a model's "tool_use" template
    when tools are given and it has one (transformers' rule), else its default; None without a template."""
    pick = getattr(chat_format, "template_for", None)
    return pick(tools) if pick is not None else None


def template_supports_tools(chat_format: Any, tools: Optional[list] = None) -> bool:
    """True when the Jinja template a request with these tools renders with handles `tools` itself."""
    template = request_template(chat_format, tools)
    return isinstance(template, str) and "tools" in template


def tool_specs(tools: list[Any]) -> list[dict]:
    """The tools as plain OpenAI dicts (`{"type": "function", "function": {...}}`)."""
    return [t.model_dump(exclude_none=True, by_alias=True) for t in tools]


def hermes_messages(messages: list[dict], tools: Optional[list[dict]]) -> list[dict]:
    """Rewrite a dialog for a template without tool support (tools in the system message)."""
    out: list[dict] = []
    for msg in messages:
        role, content = msg["role"], msg.get("content") or ""
        if role == "assistant" and msg.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                              "arguments": _loads_or_str(c["function"]["arguments"])})
                + "\n</tool_call>" for c in msg["tool_calls"]
            )
            out.append({"role": "assistant", "content": (content + "\n" if content else "") + calls})
        elif role == "tool":
            text = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool": True})
        else:
            out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool", None)
    if tools:
        described = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        system = HERMES_SYSTEM.format(tools=described)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def nine_char_ids(template: Any) -> bool:
    """True for a template that refuses tool-call ids other than 9 characters (Mistral's say so in the check
    they raise from: `tool_call.id|length != 9`)."""
    return isinstance(template, str) and "length != 9" in template


def _nine(call_id: Any) -> Any:
    """A client's tool-call id as 9 alphanumerics (kept if it is one; else a digest of it, so a call and the
    result naming it still match), as vLLM shortens ids for Mistral models."""
    if not isinstance(call_id, str) or (len(call_id) == 9 and call_id.isalnum()):
        return call_id
    return hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).hexdigest()[:9]


def template_messages(messages: list[dict], nine: bool = False) -> list[dict]:
    """Messages for a template with tool support: tool-call arguments as objects (HF convention); with
    `nine`, ids of 9 characters (see `nine_char_ids`)."""
    ids = _nine if nine else (lambda i: i)
    out = []
    for msg in messages:
        msg = dict(msg)
        if nine and msg.get("tool_call_id"):
            msg["tool_call_id"] = ids(msg["tool_call_id"])
        if msg.get("tool_calls"):
            msg["tool_calls"] = [
                {"id": ids(c.get("id")), "type": "function",
                 "function": {"name": c["function"]["name"], "arguments": _loads_or_str(c["function"]["arguments"])}}
                for c in msg["tool_calls"]
            ]
        if msg.get("content") is None:
            msg["content"] = ""
        out.append(msg)
    return out


def forced_call_schema(tools: list[dict], name: Optional[str]) -> dict:
    """JSON schema of one call `{"name": ..., "arguments": {...}}` to the named tool (any tool if None)."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    options = [
        {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
         "properties": {"name": {"const": f["name"]},
                        "arguments": f.get("parameters") or {"type": "object"}}}
        for f in chosen
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def parse_tool_calls(text: str, tool_names: set[str]) -> tuple[Optional[str], list[dict]]:
    """Split an answer into (content, tool_calls); calls to unknown functions are left as text."""
    calls, spans = [], []
    for m in TOOL_CALL_RE.finditer(text):
        call = _as_call(m.group(1), tool_names)
        if call is not None:
            calls.append(call)
            spans.append(m.span())
    if not calls:
        named = _mistral_named_calls(text, tool_names)
        if named is not None:
            return named
        blob = text.strip().removeprefix(MISTRAL_CALLS).strip()
        call = _as_call(blob, tool_names)
        if call is not None:
            return None, [call]
        listed = _as_call_list(blob, tool_names)
        return (None, listed) if listed else (text, [])
    rest, pos = [], 0
    for a, b in spans:
        rest.append(text[pos:a])
        pos = b
    rest.append(text[pos:])
    content = "".join(rest).strip()
    return (content or None), calls


def _mistral_named_calls(text: str, tool_names: set[str]) -> Optional[tuple[Optional[str], list[dict]]]:
    """(content, calls) of an answer in Mistral-Small-3's form, every call to a known function; else None."""
    calls, pos, first = [], 0, None
    for m in MISTRAL_NAMED_RE.finditer(text):
        if m.start() < pos:  # inside the arguments of the call before
            continue
        if first is not None and text[pos:m.start()].strip():
            return None  # text between calls: not this form
        try:
            args, end = json.JSONDecoder().raw_decode(text, m.end())
        except (ValueError, RecursionError):
            return None
        call = _call({"name": m.group(1), "arguments": args}, tool_names)
        if call is None or not isinstance(args, dict):
            return None
        first = m.start() if first is None else first
        calls.append(call)
        pos = end
    if not calls or text[pos:].strip():
        return None
    return (text[:first].strip() or None), calls


def call_id() -> str:
    """A fresh tool-call id: 9 alphanumeric characters (Mistral's templates refuse any other)."""
    return uuid.uuid4().hex[:9]


def _json(blob: str) -> Any:
    try:
        return json.loads(blob)
    except (ValueError, RecursionError):
        return None


def _as_call_list(blob: str, tool_names: set[str]) -> list[dict]:
    """The calls of an answer that is a JSON list of calls, every one to a known function (else none)."""
    items = _json(blob) if blob.startswith("[") else None
    if not isinstance(items, list) or not items:
        return []
    calls = [_call(item, tool_names) for item in items]
    return calls if all(c is not None for c in calls) else []


def _as_call(blob: str, tool_names: set[str]) -> Optional[dict]:
    return _call(_json(blob), tool_names)


def _call(obj: Any, tool_names: set[str]) -> Optional[dict]:
    if not isinstance(obj, dict) or obj.get("name") not in tool_names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = _loads_or_str(args)
    return {
        "id": call_id(),
        "type": "function",
        "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)},
    }


def _loads_or_str(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
