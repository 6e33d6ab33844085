"""The HTTP face of the engine (FastAPI; SSE through sse-starlette).

Routes:
- `POST /v1/chat/completions`: OpenAI's chat completions, streamed (`"stream": true`, SSE chunks,
  `data: [DONE]`) or not; `model` is the base or a prefix name; `max_tokens`, `temperature` (0 =
  greedy), `top_p`, `stop`, `seed`, `stream_options.include_usage`; `usage` counts tokens.
- `GET /v1/models`: the base model, then the prefixes.
- `GET /health`: status, models, running and waiting requests.
- `POST /`: the original `api.py` (`prompt`, `history`, `max_length`, `top_p`, `temperature`; optional
  `model`) -> `{response, history, status, time}`.
- `GET /`: the web chat page.

Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request
(the message says which field and why), 404 for an unknown model, 429 when the queue is full, 504
when a request runs out of time, 500 when this request failed in the engine (the others go on). A
client that disconnects cancels its request (a non-streamed one ends with 499, which nobody reads).
"""
from __future__ import annotations

import asyncio
import datetime
import json
import time
import uuid
from importlib import resources
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from .engine import Engine, Event, QueueFull, SamplingParams, UnknownModel
from .text import BadRequest, chat_prompt, messages_to_chat

DISCONNECT_POLL = 0.2  # seconds between checks that a non-streaming client is still there


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields are accepted and ignored unless listed below

    model: str
    messages: list[dict[str, Any]]
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(0.95, ge=0, le=2)
    top_p: float = Field(0.7, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    presence_penalty: float = 0
    frequency_penalty: float = 0
    logprobs: Optional[bool] = None


class ApiItem(BaseModel):
    """The original api.py's request."""

    prompt: str
    history: list[list[str]] = Field(default_factory=list)
    max_length: int = Field(2048, ge=1)
    top_p: float = Field(0.7, gt=0, le=1)
    temperature: float = Field(0.95, ge=0, le=2)
    model: Optional[str] = None


def error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for item in err.errors():
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        param = param or where or None
        parts.append(f"{where or 'body'}: {item.get('msg')}")
    return "; ".join(parts) or "invalid request", param


def create_app(engine: Engine, timeout: float | None = 600.0) -> FastAPI:
    """A FastAPI app serving `engine` (started and stopped with the app). `timeout`: seconds per request."""

    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="glm_kernels", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def bad_body(request, err):
        message, param = _validation_message(err)
        return error(400, message, "invalid_request_error", param)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": engine.model_names, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "glm_kernels",
             "pre_seq_len": prefix.length} for name, prefix in engine.prefixes.items()]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (resources.files(__package__) / "static" / "index.html").read_text(encoding="utf-8")

    def submit(model: str, ids: list[int], max_new_tokens: int | None, params: dict, on_event):
        """Check and queue; raises BadRequest / UnknownModel / QueueFull."""
        limit = engine.check(model, len(ids), max_new_tokens)
        return engine.submit(model, ids, SamplingParams(max_new_tokens=limit, **params), on_event, timeout=timeout)

    def refused(err: Exception) -> JSONResponse:
        if isinstance(err, UnknownModel):
            return error(404, f"the model {err.args[0]!r} does not exist; this server has "
                              f"{', '.join(engine.model_names)}", "invalid_request_error", "model")
        if isinstance(err, QueueFull):
            return error(429, str(err), "rate_limit_error")
        return error(400, str(err), "invalid_request_error", getattr(err, "param", None))

    def queue_of():
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        return events, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)

    async def collect(request: Request, events, handle) -> tuple[str, Event]:
        """Wait for the end of a non-streamed request; a client that goes away cancels it."""
        text = []
        next_check = time.monotonic() + DISCONNECT_POLL
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL)
            except asyncio.TimeoutError:
                ev = None
            if ev is not None:
                text.append(ev.text)
                if ev.finish_reason:
                    return "".join(text), ev
            if time.monotonic() >= next_check:  # checked on time, also while tokens keep coming
                next_check = time.monotonic() + DISCONNECT_POLL
                if await request.is_disconnected():  # nobody to answer: end with what the engine says
                    handle.cancel()
                    return "".join(text), Event("", "cancelled", error="the client disconnected")

    def problem(ev: Event) -> tuple[int, str, str] | None:
        """(HTTP status, message, error type) of a request that ended without an answer, else None."""
        if ev.finish_reason == "timeout":
            return 504, f"the request did not finish within {timeout:g} s", "timeout_error"
        if ev.finish_reason == "error":
            return 500, ev.error or "the request failed", "server_error"
        if ev.finish_reason == "cancelled":  # the client left (nobody reads this) or the server is stopping
            return 499 if ev.error == "the client disconnected" else 503, ev.error or "cancelled", "server_error"
        return None

    async def answer(request: Request, events, handle) -> tuple[str, Event] | JSONResponse:
        """A non-streamed request's text and last event, or the error response when it has no answer."""
        try:
            text, last = await collect(request, events, handle)
        finally:
            if not handle.done:
                handle.cancel()
        failed = problem(last)
        return (text, last) if failed is None else error(*failed)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        try:
            if body.n != 1:
                raise BadRequest("n must be 1 (one choice per request)", "n")
            if body.logprobs:
                raise BadRequest("logprobs are not supported", "logprobs")
            if body.presence_penalty or body.frequency_penalty:
                raise BadRequest("presence_penalty and frequency_penalty are not supported (use 0)",
                                 "presence_penalty" if body.presence_penalty else "frequency_penalty")
            stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
            if len(stop) > 4:
                raise BadRequest("stop takes at most 4 strings", "stop")
            query, history = messages_to_chat(body.messages)
            events, on_event = queue_of()
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            handle = submit(body.model, engine.tokenizer(chat_prompt(query, history))["input_ids"], max_tokens,
                            dict(temperature=body.temperature, top_p=body.top_p, stop=tuple(stop), seed=body.seed),
                            on_event)
        except (BadRequest, UnknownModel, QueueFull) as err:
            return refused(err)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return EventSourceResponse(stream(events, handle, completion_id, created, body.model, include_usage),
                                       ping=15)
        result = await answer(request, events, handle)
        if isinstance(result, JSONResponse):
            return result
        text, last = result
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": last.finish_reason}],
            "usage": usage(last),
        }

    async def stream(events, handle, completion_id, created, model, include_usage):
        def chunk(delta, finish_reason=None, **extra):
            return json.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                               "model": model, "choices": [{"index": 0, "delta": delta,
                                                            "finish_reason": finish_reason}], **extra},
                              ensure_ascii=False)

        try:  # sse-starlette cancels this generator when the client disconnects: `finally` frees the row
            yield {"data": chunk({"role": "assistant", "content": ""})}
            while True:
                ev = await events.get()
                failed = problem(ev)
                if failed is not None:
                    _, message, kind = failed
                    yield {"data": json.dumps({"error": {"message": message, "type": kind}})}
                    return
                if ev.text:
                    yield {"data": chunk({"content": ev.text})}
                if ev.finish_reason:
                    yield {"data": chunk({}, ev.finish_reason)}
                    if include_usage:
                        yield {"data": json.dumps({"id": completion_id, "object": "chat.completion.chunk",
                                                   "created": created, "model": model, "choices": [],
                                                   "usage": usage(ev)})}
                    yield {"data": "[DONE]"}
                    return
        finally:
            if not handle.done:
                handle.cancel()

    @app.post("/")
    async def original_api(item: ApiItem, request: Request):
        try:
            for i, turn in enumerate(item.history):
                if len(turn) != 2:
                    raise BadRequest(f"history[{i}] must be a [query, response] pair", "history")
            history = [tuple(turn) for turn in item.history]
            prompt = chat_prompt(item.prompt, history)
            model = item.model or engine.model_names[0]
            ids = engine.tokenizer(prompt)["input_ids"]
            n_prompt = len(ids)
            if item.max_length <= n_prompt:
                raise BadRequest(f"max_length={item.max_length} leaves no room for an answer after the prompt's "
                                 f"{n_prompt} tokens", "max_length")
            room = engine.check(model, n_prompt, None)  # the prompt must fit the server's context
            events, on_event = queue_of()
            handle = submit(model, ids, min(room, item.max_length - n_prompt),
                            dict(temperature=item.temperature, top_p=item.top_p), on_event)
        except (BadRequest, UnknownModel, QueueFull) as err:
            return refused(err)
        result = await answer(request, events, handle)
        if isinstance(result, JSONResponse):
            return result
        response, _ = result
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        return {"response": response, "history": [list(t) for t in history] + [[item.prompt, response]],
                "status": 200, "time": now}

    return app


def usage(ev: Event) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}
