"""Turning a validated API request into engine `Job`s: prompts to token ids, parameters checked.

Everything a request can get wrong that the schema cannot see is found here and reported as a 400
naming the parameter: a prompt that does not fit the context (never truncated), `max_tokens` past
it or below 1 (0 only with a completion's `echo`), token ids outside the vocabulary, a bad `logit_bias`,
more choices than slots or more prompts than the queue holds (limits no retry can meet), a schema the
grammar engine rejects, a dialog the chat format refuses; a `model` that is not served is a 404
`model_not_found`, as OpenAI answers. Sampling values are checked by the engine's `SamplingParams` (the
same checks as the Python API's).
"""

from __future__ import annotations

import json

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from llamaforge.api import GrammarError, GrammarUnavailable, Job, SamplingParams, has_special_tags
from llamaforge.errors import GenerationError, LlamaforgeError
from llamaforge.server.errors import APIError, bad_request
from llamaforge.server.schemas import (
    MAX_STOP_STRINGS, UNSERVED_EXTENSIONS, ChatCompletionRequest, CompletionRequest, EmbeddingRequest, SamplingFields,
    TokenizeRequest,
)
from llamaforge.server import tools as tooling

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
REASONING_FORMATS = ("auto", "deepseek", "none")  # llama.cpp server's (but "deepseek-legacy")

# A request that omits them samples as Meta's API, the CLI and the chat page do (not OpenAI's 1.0 / 1.0).
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = SamplingParams.temperature, SamplingParams.top_p


@dataclass
class Prepared:
    """The jobs of one request and what the response builder needs to know about them."""

    jobs: list[Job]
    n: int
    prompt_texts: list[str] = field(default_factory=list)
    echo: bool = False  # completions: the prompt comes first in the text (and its logprobs in logprobs)
    tool_names: set[str] = field(default_factory=set)  # non-empty: parse tool calls from the answer
    forced_tool: bool = False
    one_tool_call: bool = False  # parallel_tool_calls=false: only the first call the answer makes
    # a thinking model's answers: (the tags around the thoughts, whether the prompt already opened them)
    think: Optional[tuple[tuple[str, str], bool]] = None


def check_text(text: str, param: str) -> None:
    """A 400 for text that is not valid Unicode (JSON allows lone surrogates such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{param} is not valid Unicode text: {exc.reason} at position {exc.start}", param,
                          "invalid_text") from None


class Preparer:
    """Request validation and encoding for one served `Llama`."""

    def __init__(self, llama, *, n_slots: int, max_queue: int, model_id: str, aliases: set[str] = frozenset(),
                 reasoning_format: str = "auto"):
        self.llama = llama
        self.reasoning_format = reasoning_format  # a request's default (llama.cpp's --reasoning-format)
        self.tokenizer = llama.tokenizer
        self.chat_format = llama.chat_format
        self.max_seq_len = llama.max_seq_len
        self.vocab_size = llama.args.vocab_size
        self.n_slots = n_slots
        self.max_queue = max_queue
        self.model_id = model_id
        self.model_names = {model_id, *aliases}
        # No token stands for more than `longest` bytes of text; with 4x room for normalizers that shorten
        # text (NFKC), text over max_text_bytes cannot fit the context and is refused before it is tokenized
        # (a 7 MB prompt took 25 s of a core to be found too long).
        longest = max((len(b) for b in self.tokenizer.token_bytes_table()), default=1)
        self.max_text_bytes = 4 * max(longest, 1) * self.max_seq_len

    # -- shared checks --------------------------------------------------------------------------

    def check_size(self, nbytes: int, param: str, what: str) -> None:
        """A 400 for text too long to fit the context whatever its tokens (see max_text_bytes)."""
        if nbytes > self.max_text_bytes:
            raise bad_request(
                f"{what} has {nbytes} bytes of text, more than {self.max_seq_len} tokens (this server's context) can "
                f"hold: no token of this model covers more than {self.max_text_bytes // (4 * self.max_seq_len)} "
                f"bytes; shorten it (prompts are never truncated)", param, "context_length_exceeded")

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name not in self.model_names:
            raise APIError(404, f"the model {name!r} is not served here; this server serves {self.model_id!r} "
                           f"(see GET /v1/models)", param="model", code="model_not_found")

    def adapter_for(self, name: Optional[str]) -> Optional[str]:
        """The LoRA adapter a request's `model` names (None: the base model); 404 if it is neither."""
        if name is None or name in self.model_names:
            return None
        adapters = self.llama.adapters.names()
        if name in adapters:
            return name
        raise APIError(404, f"the model {name!r} is not served here; this server serves {self.model_id!r}"
                       f"{' and the adapters ' + ', '.join(map(repr, adapters)) if adapters else ''} "
                       f"(see GET /v1/models)", param="model", code="model_not_found")

    def _token_ids(self, ids: list[int], param: str) -> list[int]:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"{param} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}", param)
        return list(ids)

    def _check_fits(self, prompt: list[int], max_tokens: Optional[int], default: Optional[int], param: str,
                    max_param: str = "max_tokens", fill: bool = False, zero_ok: bool = False) -> int:
        """The tokens a prompt may generate; `fill` (Ollama's num_predict): no default, and cut to the room left;
        0 only with `zero_ok` (a completion with echo scores its prompt, as vLLM's echo without generation)."""
        if max_tokens is not None and max_tokens < 1 and not (fill or zero_ok):
            raise bad_request(f"{max_param} must be at least 1, got {max_tokens}", max_param, "invalid_value")
        if not prompt:
            raise bad_request("the prompt is empty; give at least one token", param, "empty_prompt")
        room = self.max_seq_len - len(prompt)
        if room < 1:
            raise bad_request(
                f"the prompt has {len(prompt)} tokens but this server's context is {self.max_seq_len} tokens "
                f"(prompt + completion); shorten the prompt or restart the server with a larger --max-seq-len "
                f"(prompts are never truncated)", param, "context_length_exceeded")
        if max_tokens is None:
            return room if default is None or fill else min(default, room)
        if max_tokens > room and not fill:
            raise bad_request(
                f"max_tokens={max_tokens} does not fit: the prompt has {len(prompt)} tokens and the context is "
                f"{self.max_seq_len}, so at most {room} tokens can be generated", max_param,
                "context_length_exceeded")
        return min(max_tokens, room)

    def _params(self, req: SamplingFields) -> SamplingParams:
        bias = []
        for key, value in (req.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
            if not 0 <= token < self.vocab_size:
                raise bad_request(f"logit_bias token {token} is outside the vocabulary [0, {self.vocab_size})",
                                  "logit_bias")
            if not -100 <= value <= 100:
                raise bad_request(f"logit_bias values must be in [-100, 100], got {value} for token {token}",
                                  "logit_bias")
            bias.append((token, float(value)))
        try:
            return SamplingParams(
                temperature=DEFAULT_TEMPERATURE if req.temperature is None else float(req.temperature),
                top_p=DEFAULT_TOP_P if req.top_p is None else float(req.top_p),
                top_k=req.top_k if req.top_k and req.top_k > 0 else None,  # 0 or -1: all tokens
                min_p=float(req.min_p or 0.0),
                presence_penalty=float(req.presence_penalty or 0.0),
                frequency_penalty=float(req.frequency_penalty or 0.0),
                repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
                logit_bias=tuple(bias),
            )
        except GenerationError as exc:
            raise bad_request(str(exc), code="invalid_value") from exc

    def _stops(self, stop: Union[None, str, list[str]]) -> tuple[str, ...]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        for s in stops:
            check_text(s, "stop")
        if len(stops) > MAX_STOP_STRINGS:
            raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
        return tuple(s for s in stops if s)

    def _check_n(self, n: int, best_of: Optional[int] = None) -> None:
        if n > self.n_slots:
            raise bad_request(f"n={n} is more than this server's {self.n_slots} slots (--max-batch-size)", "n")
        if best_of is not None and best_of != n:
            raise bad_request("best_of is not supported (only best_of == n)", "best_of")

    # -- endpoints ------------------------------------------------------------------------------

    def completion(self, req: CompletionRequest, fill: bool = False) -> Prepared:
        """Jobs of a /v1/completions request; `fill`: max_tokens counts at most to a full context
        (Ollama's num_predict)."""
        adapter = self.adapter_for(req.model)
        self._check_n(req.n, req.best_of)
        if req.suffix:
            raise bad_request("suffix (fill-in-the-middle) is not supported", "suffix")
        prompts = self._prompts(req.prompt, "prompt", bos=True)
        if len(prompts) > self.max_queue:
            raise bad_request(f"{len(prompts)} prompts in one request, but this server queues at most "
                              f"{self.max_queue} (--max-queue); send fewer prompts per request", "prompt",
                              "request_too_large")
        params, stops = self._params(req), self._stops(req.stop)
        constraint = self._guided(req)
        jobs, texts = [], []
        for ids, text in prompts:
            max_tokens = self._check_fits(ids, req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, "prompt", fill=fill,
                                          zero_ok=req.echo)
            jobs.append(Job(
                ids, max_tokens, params, n=req.n, seed=req.seed, stop_ids=self.tokenizer.stop_ids, stop=stops,
                logprobs=req.logprobs, prompt_logprobs=req.logprobs if req.echo else None, adapter=adapter,
                constraint=constraint,
            ))
            texts.append(text)
        return Prepared(jobs, req.n, texts, echo=req.echo)

    def chat(self, req: ChatCompletionRequest, fill: bool = False) -> Prepared:
        """Jobs of a /v1/chat/completions request; `fill` as for `completion`."""
        adapter = self.adapter_for(req.model)
        self._check_n(req.n)
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise bad_request("max_tokens and max_completion_tokens disagree; give one", "max_completion_tokens")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        self._check_unsupported_chat(req)
        messages = [self._message(i, m) for i, m in enumerate(req.messages)]
        texts = [t for m in messages for t in (m["content"], m.get("reasoning_content")) if t]
        self.check_size(sum(len(t.encode("utf-8")) for t in texts), "messages", "the messages' content")
        tools = tooling.tool_specs(req.tools) if req.tools else []
        choice = req.tool_choice
        if choice is not None and not isinstance(choice, str) and choice.function.name not in \
                {t["function"]["name"] for t in tools}:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not in tools", "tool_choice")
        if choice == "required" and not tools:
            raise bad_request("tool_choice='required' needs tools", "tool_choice")
        use_tools = bool(tools) and choice != "none"
        prompt = self._encode_chat(messages, tools if use_tools else None, req.chat_template_kwargs)
        prompt = self._continued(getattr(req, "context", None), prompt)
        forced = use_tools and choice is not None and choice != "auto"
        constraint = self._guided(req)
        if constraint is not None and (forced or (req.response_format is not None
                                                  and req.response_format.type != "text")):
            raise bad_request("guided_json and response_format / a forced tool_choice both constrain the answer; "
                              "give one", "guided_json")
        if forced:
            name = None if isinstance(choice, str) else choice.function.name
            constraint = self._constraint(tooling.forced_call_schema(tools, name), "tool_choice")
        elif req.response_format is not None and req.response_format.type != "text":
            fmt = req.response_format
            constraint = self._constraint(fmt.model_dump(by_alias=True), "response_format", response_format=True)
        max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._check_fits(prompt, max_tokens, None, "messages", max_param, fill=fill)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        job = Job(prompt, max_tokens, self._params(req), n=req.n, seed=req.seed,
                  stop_ids=frozenset(self.chat_format.stop_ids), stop=self._stops(req.stop), logprobs=logprobs,
                  constraint=constraint, adapter=adapter)
        names = {t["function"]["name"] for t in tools} if use_tools else set()
        return Prepared([job], req.n, tool_names=names, forced_tool=forced,
                        one_tool_call=req.parallel_tool_calls is False,
                        think=self._thinking(prompt, req.reasoning_format or self.reasoning_format,
                                             constrained=constraint is not None))

    def _continued(self, context: Optional[list[int]], prompt: list[int]) -> list[int]:
        """Ollama's /api/generate `context` (the ids of an earlier exchange, checked by its route) followed by the
        new turn, whose leading BOS is dropped (one BOS begins the exchange, as Ollama's prompt has one)."""
        if not context:
            return prompt
        bos = self.tokenizer.bos_id
        return list(context) + (prompt[1:] if prompt and bos is not None and prompt[0] == bos else prompt)

    def _thinking(self, prompt: list[int], reasoning_format: Optional[str], constrained: bool):
        """How a chat answer's thoughts are split off (Prepared.think), as llama.cpp's server does by default:
        for a model with a thinking mode (its chat format's `think_tags`), unless `reasoning_format` is "none" or
        the answer is constrained (JSON from its first token, no thoughts); the thoughts are open from the start
        when the prompt ends with the opening tag (llama.cpp's `thinking_forced_open`)."""
        tags = getattr(self.chat_format, "think_tags", None)
        if tags is None or reasoning_format == "none" or constrained:
            return None
        return tags, self.tokenizer.decode(prompt[-16:]).rstrip().endswith(tags[0])

    @staticmethod
    def _check_unsupported_chat(req: ChatCompletionRequest) -> None:
        """400s for chat fields OpenAI has whose meaning this server cannot give (ignoring them would change
        what the client gets without saying so)."""
        for legacy in ("functions", "function_call"):
            if getattr(req, legacy) is not None:
                raise bad_request(f"{legacy} (OpenAI's deprecated function calling) is not supported; send the "
                                  "functions as tools=[{\"type\": \"function\", \"function\": {...}}] and "
                                  "function_call as tool_choice", legacy)
        if req.modalities is not None and set(req.modalities) - {"text"}:
            raise bad_request(f"modalities={req.modalities}: this server answers in text only (send [\"text\"] "
                              "or leave modalities out)", "modalities")
        if req.audio is not None:
            raise bad_request("audio output is not supported: this server answers in text only", "audio")

    def tokenize(self, req: TokenizeRequest) -> list[int]:
        """The prompt ids a completion (`prompt`) or chat (`messages`) request would use."""
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        if req.prompt is not None:
            check_text(req.prompt, "prompt")
            return self.tokenizer.encode(req.prompt, bos=req.add_special_tokens and self.tokenizer.add_bos)
        return self._encode_chat([self._message(i, m) for i, m in enumerate(req.messages)], None)

    def embedding_inputs(self, req: EmbeddingRequest, dim: int, *, truncate: bool = False) -> list[list[int]]:
        """Each input's ids; one longer than the context is a 400, or with `truncate` (Ollama's /api/embed
        default) cut to its first max_seq_len tokens, as Ollama truncates the end of each input."""
        self.check_model(req.model)
        if req.dimensions is not None and req.dimensions != dim:
            raise bad_request(f"this model's embeddings have {dim} dimensions; got dimensions={req.dimensions}",
                              "dimensions")
        out = []
        for ids, _ in self._prompts(req.input, "input", bos=True):
            if not ids:
                raise bad_request("an input is empty", "input")
            if len(ids) > self.max_seq_len and truncate:
                ids = ids[: self.max_seq_len]
            elif len(ids) > self.max_seq_len:
                raise bad_request(f"an input has {len(ids)} tokens but the context is {self.max_seq_len}; "
                                  "inputs are never truncated", "input", "context_length_exceeded")
            out.append(ids)
        return out

    # -- helpers --------------------------------------------------------------------------------

    def _prompts(self, prompt: Any, param: str, *, bos: bool) -> list[tuple[list[int], str]]:
        """(ids, text) per prompt from str | list[str] | list[int] | list[list[int]]."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise bad_request(f"{param} is an empty list", param)
        if all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        for p in prompt:  # every text checked before any is tokenized
            if isinstance(p, str):
                check_text(p, param)
                self.check_size(len(p.encode("utf-8")), param, f"the {param}")
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids = self.tokenizer.encode(p, bos=bos and self.tokenizer.add_bos)
                out.append((ids, p))
            else:
                ids = self._token_ids(p, param)
                out.append((ids, self.tokenizer.decode(ids) if ids else ""))
        return out

    def _message(self, i: int, m: Any) -> dict:
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if getattr(part, "text", None) is None:
                    raise bad_request(f"messages[{i}] has a {part.type} part; this model takes text only",
                                      f"messages.{i}.content")
                texts.append(part.text)
            content = "".join(texts)
        if content is not None:
            check_text(content, f"messages.{i}.content")
        if content is None and m.role != "assistant":
            raise bad_request(f"messages[{i}] ({m.role}) has no content", f"messages.{i}.content")
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.reasoning_content is not None:
            check_text(m.reasoning_content, f"messages.{i}.reasoning_content")
            msg["reasoning_content"] = m.reasoning_content
        if m.name:
            msg["name"] = m.name
        return msg

    def _encode_chat(self, messages: list[dict], tools: Optional[list[dict]],
                     variables: Optional[dict] = None) -> list[int]:
        fmt = self.chat_format
        has_tool_parts = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        if variables is not None and fmt.name != "jinja":
            raise bad_request(f"chat_template_kwargs needs a model with a chat template; this model's chat "
                              f"format is {fmt.name}'s", "chat_template_kwargs")
        extra = {"variables": variables} if variables is not None else {}
        try:
            if tooling.template_supports_tools(fmt, tools):
                nine = tooling.nine_char_ids(tooling.request_template(fmt, tools))
                return fmt.encode_dialog(tooling.template_messages(messages, nine), tools=tools, **extra)
            if tools or has_tool_parts:
                messages = tooling.hermes_messages(messages, tools)
            plain = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
            if fmt.name == "llama2":
                if has_special_tags(plain):
                    raise bad_request("special tags ([INST], [/INST], <<SYS>>, <</SYS>>) are not allowed in "
                                      "messages for this model's chat format", "messages")
            return fmt.encode_dialog(plain, **extra)
        except LlamaforgeError as exc:
            if variables is not None and "template variable" in str(exc):
                raise bad_request(f"chat_template_kwargs: {exc}", "chat_template_kwargs") from exc
            raise bad_request(f"the chat format rejected the messages: {exc}", "messages") from exc

    @staticmethod
    def _check_extensions(req: SamplingFields) -> None:
        """A 400 for a vLLM extension this server does not implement, set to a value that would change the answer."""
        extra = req.model_extra or {}
        for name, neutral in UNSERVED_EXTENSIONS.items():
            if name in extra and extra[name] != neutral and not (neutral is None and extra[name] == []):
                raise bad_request(f"{name}={extra[name]!r} (vLLM's) is not supported by this server (leave it out"
                                  + ("" if neutral is None else f" or send {json.dumps(neutral)}") + ")", name)

    def _guided(self, req: SamplingFields):
        """The constraint of vLLM's `guided_json` (a schema, or one as JSON text); a 400 for the other guided_*."""
        self._check_extensions(req)
        for name in ("guided_regex", "guided_choice", "guided_grammar", "structured_outputs"):
            if getattr(req, name) is not None:
                raise bad_request(f"{name} (vLLM's) is not supported; constrain the answer with guided_json or "
                                  "response_format json_schema", name)
        schema = req.guided_json
        if schema is None:
            return None
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (ValueError, RecursionError) as exc:
                raise bad_request(f"guided_json is text but not JSON: {exc}", "guided_json", "invalid_schema") from None
        if not isinstance(schema, dict):
            raise bad_request("guided_json must be a JSON schema object", "guided_json", "invalid_schema")
        return self._constraint(schema, "guided_json")

    def _constraint(self, schema: Optional[dict], param: str, *, response_format: bool = False):
        """A constraint factory from a JSON schema, or from an OpenAI response_format (as the Python API's)."""
        grammar = self.llama.grammar
        try:
            return grammar.response_format(schema) if response_format else grammar.json_schema(schema)
        except GrammarError as exc:
            raise bad_request(str(exc), param, "invalid_schema") from exc
        except GrammarUnavailable as exc:
            raise APIError(400, str(exc), param=param, code="unsupported")
