"""From engine events to OpenAI responses: whole JSON bodies, or server-sent events ending in [DONE].

`JobRun` submits a request's jobs and hands their events to the asyncio side (the engine calls the
sink on its own thread; `call_soon_threadsafe` moves each event onto the event loop). Leaving a
`JobRun` early - a client that disconnected, a server shutting down - cancels its jobs, which frees
their slots at the engine's next step.

Usage counts are exact: `prompt_tokens` is the length of each prompt in tokens (once per prompt, not
per choice), `completion_tokens` every token each choice generated, the token that ended it (EOS,
end of turn) included; `prompt_tokens_details.cached_tokens` says how many prompt tokens came from
the prefix cache.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from llamaforge.api import Delta, Engine, EngineClosed, Failure, Finish, PromptDone, QueueFull, TokenInfo
from llamaforge.errors import GenerationError
from llamaforge.server.errors import APIError
from llamaforge.server.prepare import Prepared
from llamaforge.server.reasoning import ThinkSplit
from llamaforge.server.tools import parse_tool_calls


@dataclass
class Timing:
    """When a request's events arrived (time.monotonic() seconds) and what they counted: for the log and /metrics."""

    submitted: float = field(default_factory=time.monotonic)
    first_token: Optional[float] = None  # the first generated token reached the server
    finished: Optional[float] = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    failed: bool = False

    def see(self, event) -> None:
        now = time.monotonic()
        if isinstance(event, Failure):
            self.failed = True
        elif isinstance(event, PromptDone):
            self.cached_tokens += event.cached_tokens
        elif isinstance(event, Delta):
            if self.first_token is None and event.tokens:
                self.first_token = now
        elif isinstance(event, Finish):
            self.completion_tokens += event.completion_tokens
            self.finish_reasons.append(event.reason)
            self.finished = now
            if self.first_token is None and event.completion_tokens:
                self.first_token = now


class JobRun:
    """The events of one request's jobs, as an async iterator of (job index, event)."""

    def __init__(self, engine: Engine, prepared: Prepared):
        self.engine = engine
        self.prepared = prepared
        self.timing = Timing(prompt_tokens=sum(len(j.prompt) for j in prepared.jobs))
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []
        self.open = len(prepared.jobs) * prepared.n
        try:  # all jobs or none
            self.ids = engine.submit_all(prepared.jobs, [self._sink(k) for k in range(len(prepared.jobs))])
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}", code="queue_full") from exc
        except EngineClosed as exc:
            raise APIError(503, str(exc), code="shutting_down") from exc
        except GenerationError as exc:  # can never run here: retrying does not help
            raise APIError(400, str(exc), code="request_too_large") from exc

    def _sink(self, k: int):
        def put(event) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (k, event))
        return put

    def cancel(self) -> None:
        for job_id in self.ids:
            self.engine.cancel(job_id)

    @property
    def outcome(self) -> Optional[str]:
        """None when every choice finished, else "error" (the engine failed it) or "cancelled"."""
        if self.timing.failed:
            return "error"
        return "cancelled" if self.open > 0 else None

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        """Yield events until every choice has finished; a Failure raises APIError."""
        try:
            while self.open > 0:
                k, event = await self.queue.get()
                self.timing.see(event)
                if isinstance(event, Failure):
                    raise APIError(event.status, event.message)
                if isinstance(event, Finish):
                    self.open -= 1
                yield k, event
        finally:
            if self.open > 0:
                self.cancel()


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    tokens: list[TokenInfo] = field(default_factory=list)
    finish: Optional[str] = None
    completion_tokens: int = 0
    stop_id: Optional[int] = None  # the stop id that ended it
    streamed: int = 0  # characters of text sent so far (streamed completions: where text_offset goes on)
    split: Optional[ThinkSplit] = None  # a thinking model's chat answer: thoughts apart from the content
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    fresh: tuple[str, str] = ("", "")  # the (thoughts, content) text the last event settled

    def take(self, text: str, final: bool = False) -> None:
        """Add a piece of the answer (`final`: its end) to the thoughts and the content."""
        if self.split is None:
            self.fresh = ("", text)
        else:
            thoughts, content = self.split.push(text)
            if final:
                more = self.split.flush()
                thoughts, content = thoughts + more[0], content + more[1]
            self.fresh = (thoughts, content)
        self.reasoning.append(self.fresh[0])
        self.content.append(self.fresh[1])


class ResponseBuilder:
    """Collects events and writes OpenAI bodies and chunks for one request."""

    def __init__(self, kind: str, prepared: Prepared, model: str, tokenizer):
        self.kind = kind  # "completion" | "chat"
        self.prepared = prepared
        self.model = model
        self.tokenizer = tokenizer
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        n = prepared.n
        self.choices = [_Choice() for _ in range(len(prepared.jobs) * n)]
        if prepared.think is not None and kind == "chat":
            for c in self.choices:
                c.split = ThinkSplit(*prepared.think)
        self.prompt_infos: dict[int, list[TokenInfo]] = {}
        self.cached = 0

    def index(self, k: int, i: int) -> int:
        return k * self.prepared.n + i

    def add(self, k: int, event) -> None:
        if isinstance(event, PromptDone):
            self.cached += event.cached_tokens
            if event.logprobs is not None:
                self.prompt_infos[k] = event.logprobs
        elif isinstance(event, Delta):
            c = self.choices[self.index(k, event.index)]
            c.text.append(event.text)
            c.tokens.extend(event.tokens)
            c.take(event.text)
        elif isinstance(event, Finish):
            c = self.choices[self.index(k, event.index)]
            c.finish, c.completion_tokens, c.stop_id = event.reason, event.completion_tokens, event.stop_id
            c.take("", final=True)

    def exchange(self, idx: int) -> list[int]:
        """The ids of a finished choice's whole exchange: its prompt, every token generated, and the stop id
        that ended it (what the model saw, so that a prompt continuing it starts with the same ids)."""
        c = self.choices[idx]
        ids = list(self.prepared.jobs[idx // self.prepared.n].prompt) + [t.id for t in c.tokens]
        return ids + ([c.stop_id] if c.stop_id is not None else [])

    def usage(self) -> dict:
        prompt = sum(len(j.prompt) for j in self.prepared.jobs)
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": self.cached}}

    # -- token strings for logprobs -------------------------------------------------------------

    def _tok_str(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")

    def _chat_logprob(self, t: TokenInfo) -> dict:
        return {"token": self._tok_str(t.id), "logprob": t.logprob, "bytes": list(self.tokenizer.token_bytes(t.id)),
                "top_logprobs": [{"token": self._tok_str(i), "logprob": lp,
                                  "bytes": list(self.tokenizer.token_bytes(i))} for i, lp in t.top]}

    def _completion_logprobs(self, infos: list[TokenInfo], offset: int) -> dict:
        """The legacy `logprobs` object; `offset`: the text offset of the first token. Each top_logprobs
        map also holds the chosen token (OpenAI: "always the logprob of the sampled token, so up to
        logprobs+1 elements")."""
        tokens = [self._tok_str(t.id) for t in infos]
        offsets, pos = [], offset
        for s in tokens:
            offsets.append(pos)
            pos += len(s)
        top = []
        for t in infos:
            if t.logprob is None:
                top.append(None)
            else:
                d: dict[str, float] = {}
                for i, lp in t.top:
                    d.setdefault(self._tok_str(i), lp)
                d.setdefault(self._tok_str(t.id), t.logprob)
                top.append(d)
        return {"tokens": tokens, "token_logprobs": [t.logprob for t in infos], "top_logprobs": top,
                "text_offset": offsets}

    # -- whole responses ------------------------------------------------------------------------

    def body(self) -> dict:
        choices = []
        for idx, c in enumerate(self.choices):
            k = idx // self.prepared.n
            text = "".join(c.text)
            if self.kind == "completion":
                logprobs = None
                if self.prepared.echo:
                    text = self.prepared.prompt_texts[k] + text
                if self.prepared.jobs[k].logprobs is not None:
                    infos = self.prompt_infos.get(k, []) + [t for t in c.tokens if t.logprob is not None]
                    logprobs = self._completion_logprobs(infos, 0)
                choices.append({"index": idx, "text": text, "logprobs": logprobs, "finish_reason": c.finish})
            else:
                choices.append(self._chat_choice(idx, c))
        obj = "text_completion" if self.kind == "completion" else "chat.completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, "usage": self.usage()}

    def _chat_choice(self, idx: int, c: _Choice) -> dict:
        """A whole chat choice; tool calls are parsed from the content after the thoughts (a call inside the
        thoughts is not made, as llama.cpp's parser reads the reasoning first)."""
        text = "".join(c.content)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = c.finish
        if self.prepared.tool_names:
            content, calls = parse_tool_calls(text, self.prepared.tool_names)
            if self.prepared.one_tool_call:
                calls = calls[:1]
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                if finish == "stop":
                    finish = "tool_calls"
        thoughts = "".join(c.reasoning)
        if thoughts:
            message["reasoning_content"] = thoughts
        logprobs = None
        if self.prepared.jobs[0].logprobs is not None:
            logprobs = {"content": [self._chat_logprob(t) for t in c.tokens if t.logprob is not None]}
        return {"index": idx, "message": message, "logprobs": logprobs, "finish_reason": finish}

    # -- streaming chunks -----------------------------------------------------------------------

    def chunk(self, choices: list[dict], usage: Optional[dict] = None) -> dict:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        body: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                                "system_fingerprint": None, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body


def sse(body: Any) -> str:
    """One server-sent event carrying JSON."""
    return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"


async def stream_chunks(run: JobRun, rb: ResponseBuilder, include_usage: bool) -> AsyncIterator[dict]:
    """The OpenAI chunks of a streaming request, in order; a failure mid-way raises APIError.

    Leaving early (the client went away, the server is stopping) cancels the request's jobs at once.
    """
    buffered = bool(rb.prepared.tool_names)  # tool calls are only known once the answer is complete
    started: set[int] = set()
    try:
        async for k, event in run.events():
            rb.add(k, event)
            if isinstance(event, PromptDone) and rb.kind == "completion" and rb.prepared.echo:
                for i in range(rb.prepared.n):  # echo: the prompt comes first
                    lp = rb._completion_logprobs(event.logprobs or [], 0) if event.logprobs is not None else None
                    rb.choices[rb.index(k, i)].streamed = len(rb.prepared.prompt_texts[k])
                    yield rb.chunk([{"index": rb.index(k, i), "text": rb.prepared.prompt_texts[k],
                                     "logprobs": lp, "finish_reason": None}])
            if isinstance(event, (Delta, Finish)):
                idx = rb.index(k, event.index)
                for piece in _chunks_for(rb, k, idx, event, started, buffered):
                    yield piece
        if include_usage:
            yield rb.chunk([], rb.usage())
    finally:
        if run.open > 0:  # the client went away (or the server is stopping): free the slots now
            run.cancel()


async def stream_events(run: JobRun, rb: ResponseBuilder, include_usage: bool) -> AsyncIterator[str]:
    """The SSE body of a streaming request, ending in `data: [DONE]`; an error mid-way is an error event."""
    chunks = stream_chunks(run, rb, include_usage)
    try:
        async for body in chunks:
            yield sse(body)
    except APIError as exc:
        yield sse(exc.body())
    finally:
        await chunks.aclose()
    yield "data: [DONE]\n\n"


def _chunks_for(rb: ResponseBuilder, k: int, idx: int, event, started: set[int], buffered: bool):
    job = rb.prepared.jobs[k]
    if rb.kind == "completion":
        if isinstance(event, Delta):
            if event.text or (job.logprobs is not None and event.tokens):
                infos = [t for t in event.tokens if t.logprob is not None]
                c = rb.choices[idx]
                lp = rb._completion_logprobs(infos, c.streamed) if job.logprobs is not None else None
                c.streamed += len(event.text)
                yield rb.chunk([{"index": idx, "text": event.text, "logprobs": lp, "finish_reason": None}])
        else:
            yield rb.chunk([{"index": idx, "text": "", "logprobs": None, "finish_reason": event.reason}])
        return
    if idx not in started:
        started.add(idx)
        yield rb.chunk([{"index": idx, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}])
    c = rb.choices[idx]
    thoughts, content = c.fresh
    if isinstance(event, Delta):
        infos = [t for t in event.tokens if t.logprob is not None]
        delta = _delta(thoughts, "" if buffered else content)
        if delta or (job.logprobs is not None and infos and not buffered):
            lp = {"content": [rb._chat_logprob(t) for t in infos]} \
                if job.logprobs is not None and not buffered else None
            yield rb.chunk([{"index": idx, "delta": delta or {"content": ""}, "logprobs": lp,
                             "finish_reason": None}])
        return
    finish = event.reason
    if buffered:  # tool calls are known now; the thoughts went out as they came
        choice = rb._chat_choice(idx, c)
        delta = _delta(thoughts, choice["message"].get("content") or "")
        if choice["message"].get("tool_calls"):
            delta["tool_calls"] = [dict(call, index=j) for j, call in enumerate(choice["message"]["tool_calls"])]
        finish = choice["finish_reason"]
        if delta:
            yield rb.chunk([{"index": idx, "delta": delta, "logprobs": choice["logprobs"], "finish_reason": None}])
    elif thoughts or content:  # held back until the end: a partial tag, trailing whitespace of the thoughts
        yield rb.chunk([{"index": idx, "delta": _delta(thoughts, content), "logprobs": None, "finish_reason": None}])
    yield rb.chunk([{"index": idx, "delta": {}, "logprobs": None, "finish_reason": finish}])


def _delta(thoughts: str, content: str) -> dict:
    """A chat chunk's delta: `reasoning_content` (llama.cpp's, vLLM's before `reasoning`) and `content`."""
    delta: dict[str, Any] = {}
    if thoughts:
        delta["reasoning_content"] = thoughts
    if content:
        delta["content"] = content
    return delta


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def until_disconnect(receive) -> None:
    """Return when the client closes the connection (the body having been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(work, receive):
    """Await `work` (a coroutine or future), or raise ClientGone as soon as the client disconnects.

    `receive` is the request's ASGI receive: once the body is read, its next message is
    `http.disconnect`, which arrives when the client closes the connection.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()  # re-raises APIError from a Failure
        raise ClientGone()
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()


async def wait_or_cancel(fut, receive):
    """The result of a concurrent Future, which is cancelled if the client goes away first."""
    try:
        return await unless_disconnected(asyncio.wrap_future(fut), receive)
    finally:
        fut.cancel()


async def collect(run: JobRun, rb: ResponseBuilder, receive) -> dict:
    """Wait for the whole response, cancelling the jobs if the client goes away meanwhile."""

    async def consume() -> dict:
        async for k, event in run.events():
            rb.add(k, event)
        return rb.body()

    try:
        return await unless_disconnected(consume(), receive)
    finally:
        if run.open > 0:
            run.cancel()
