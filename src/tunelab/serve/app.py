"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /health.

Requests are validated here (bad input is a 4xx in OpenAI's error shape, and the server keeps
serving), turned into prompt ids the way `tunelab generate` builds them, and handed to the batching
`Engine`. Streaming sends OpenAI chunks as server-sent events, ending with `data: [DONE]`.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

from tunelab.serve.engine import Engine, Job, Overloaded
from tunelab.serve.models import Served, chat_ids, completion_ids
from tunelab.serve.schemas import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    TextPart,
    describe_invalid,
    error_body,
)


@dataclass
class ServeSettings:
    api_key: str | None = None  # None = no key needed (fine on 127.0.0.1; set one before binding wider)
    cors_origins: list[str] = field(default_factory=list)  # empty = no CORS headers at all
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 2048  # the most `max_tokens` a request may ask for
    default_max_tokens: int = 256  # when the request gives none (also capped by the context left)
    max_choices: int = 64  # prompts x n in one request


# ---------------------------------------------------------------- checks


def _lookup(request: Request, name: str) -> Served:
    models: dict[str, Served] = request.app.state.engine.models
    if name not in models:  # a dict lookup, never a path: only what was loaded at start is served
        raise APIError(
            404,
            f"model '{name}' is not served here; served: {', '.join(sorted(models))}",
            "model",
            "model_not_found",
        )
    return models[name]


def _unsupported(req: BaseModel, neutral: dict[str, tuple]) -> None:
    for key, allowed in neutral.items():
        if getattr(req, key) not in allowed:
            raise APIError(400, f"'{key}' is not supported by tunelab serve", key, "unsupported_parameter")


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop: give up to 4 non-empty strings", "stop", "invalid_stop")
    return tuple(stops)


def _max_tokens(
    served: Served, lengths: list[int], asked: int | None, settings: ServeSettings, prompt_param: str
) -> int:
    if any(n == 0 for n in lengths):
        raise APIError(400, "the prompt is empty (0 tokens)", prompt_param, "empty_prompt")
    if asked is not None and asked > settings.max_tokens_limit:
        raise APIError(
            400,
            f"max_tokens is {asked}, more than this server allows ({settings.max_tokens_limit})",
            "max_tokens",
            "max_tokens_too_large",
        )
    context, longest = served.context_length, max(lengths)
    room = None if context is None else context - longest
    if room is not None and (room < 1 or (asked is not None and asked > room)):
        raise APIError(
            400,
            f"this model's context is {context} tokens; the prompt is {longest} tokens and "
            + (f"{asked} more were asked for" if asked is not None else "leaves no room for an answer")
            + ". Shorten the prompt or lower max_tokens.",
            prompt_param if asked is None else "max_tokens",
            "context_length_exceeded",
        )
    if asked is not None:
        return asked
    return min(settings.default_max_tokens, room if room is not None else settings.default_max_tokens)


def _text(content: str | list[TextPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


# ---------------------------------------------------------------- endpoints


async def completions(request: Request, req: CompletionRequest) -> Any:
    served = _lookup(request, req.model)
    _unsupported(
        req, {"echo": (None, False), "logprobs": (None,), "best_of": (None, 1), "suffix": (None, "")}
    )
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts:
        raise APIError(400, "prompt is an empty list", "prompt", "empty_prompt")
    try:
        ids = [completion_ids(served.generator, p, raw=req.raw) for p in prompts]
    except (ValueError, TypeError, UnicodeError) as e:  # e.g. a lone surrogate the tokenizer cannot encode
        raise APIError(400, f"the prompt could not be tokenized: {e}", "prompt") from None
    return await _answer(request, req, served, ids, req.max_tokens, chat=False)


async def chat_completions(request: Request, req: ChatRequest) -> Any:
    served = _lookup(request, req.model)
    _unsupported(
        req,
        {"logprobs": (None, False), "tools": (None, []), "response_format": (None, {"type": "text"})},
    )
    if not req.messages:
        raise APIError(400, "messages is empty: send at least one user message", "messages", "empty_messages")
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
        for m in req.messages
    ]
    if not any(m["role"] == "user" for m in messages):
        raise APIError(400, "messages holds no user message", "messages", "no_user_message")
    try:
        ids = [chat_ids(served.generator, messages)]
    except (TemplateError, ValueError, TypeError) as e:  # e.g. a template that insists roles alternate
        raise APIError(400, f"the model's chat template rejected these messages: {e}", "messages") from None
    return await _answer(request, req, served, ids, req.max_completion_tokens or req.max_tokens, chat=True)


async def _answer(
    request: Request, req: Sampling, served: Served, ids: list[list[int]], asked: int | None, chat: bool
) -> Any:
    engine: Engine = request.app.state.engine
    settings: ServeSettings = request.app.state.settings
    n = req.n or 1
    if len(ids) * n > settings.max_choices:
        raise APIError(400, f"prompts x n is {len(ids) * n}, over the limit of {settings.max_choices}", "n")
    max_tokens = _max_tokens(served, [len(i) for i in ids], asked, settings, "messages" if chat else "prompt")
    try:
        job = engine.submit(
            served,
            ids,
            n,
            max_tokens,
            req.temperature or 0.0,
            req.top_p or 1.0,
            req.seed,
            _stops(req.stop),
            bool(req.stream),
        )
    except Overloaded as e:
        raise APIError(503, f"server busy: {e}; retry shortly", None, "overloaded", "server_error") from None
    reply = _Reply(job, served.name, chat, [len(i) for i in ids for _ in range(n)], n)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            reply.stream(include_usage), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    try:
        await job.wait()
    except RuntimeError as e:
        raise APIError(500, str(e), None, None, "server_error") from None
    finally:
        job.cancelled = True  # stops the rows if this handler was cancelled; a no-op once done
    return reply.body()


@dataclass
class _Reply:
    """A finished (or streaming) job in OpenAI's response and chunk shapes."""

    job: Job
    model: str
    chat: bool
    prompt_lengths: list[int]  # one per row
    n: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {
            "id": ("chatcmpl-" if self.chat else "cmpl-") + self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
        }

    def usage(self) -> dict[str, int]:
        prompt = sum(self.prompt_lengths[:: self.n])  # each prompt counts once, however many choices
        completion = sum(r.generated for r in self.job.rows)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def body(self) -> dict[str, Any]:
        choices = []
        for i, r in enumerate(self.job.rows):
            out = {"message": {"role": "assistant", "content": r.text}} if self.chat else {"text": r.text}
            choices.append({"index": i, **out, "logprobs": None, "finish_reason": r.finish_reason})
        return {**self._head(False), "choices": choices, "usage": self.usage()}

    def _choice(self, i: int, text: str, reason: str | None = None) -> dict[str, Any]:
        if self.chat:
            return {
                "index": i,
                "delta": {"content": text} if text else {},
                "logprobs": None,
                "finish_reason": reason,
            }
        return {"index": i, "text": text, "logprobs": None, "finish_reason": reason}

    def _event(self, choices: list[dict], usage: dict | None, include_usage: bool) -> str:
        body = {**self._head(True), "choices": choices}
        if include_usage:  # as OpenAI: null on every chunk but the last
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        try:
            if self.chat:
                first = [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(len(self.job.rows))
                ]
                yield self._event(first, None, include_usage)
            done = False
            while not done:
                # Everything already waiting goes out in one write: one step's tokens for n choices.
                events = [await self.job.events.get()]
                while not self.job.events.empty():
                    events.append(self.job.events.get_nowait())
                out = []
                for kind, i, payload in events:
                    if kind == "text":
                        out.append(self._event([self._choice(i, payload)], None, include_usage))
                    elif kind == "finish":
                        out.append(self._event([self._choice(i, "", payload)], None, include_usage))
                    elif kind == "error":
                        out.append(f"data: {json.dumps(error_body(payload, 'server_error'))}\n\n")
                        done = True
                    else:
                        if include_usage:
                            out.append(self._event([], self.usage(), include_usage))
                        done = True
                    if done:
                        break
                yield "".join(out)
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancelled = True  # the client went away mid-stream: its rows stop at the next step


async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(name) for name in request.app.state.engine.models]}


async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    return _model_card(_lookup(request, model_id).name)


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "tunelab"}


async def health() -> dict[str, str]:
    return {"status": "ok"}


# ---------------------------------------------------------------- errors and the app


async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param, code = describe_invalid(exc.errors())
    return JSONResponse(error_body(message, "invalid_request_error", param, code), status_code=400)


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)


async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = f"{exc.detail}: {request.method} {request.url.path}"
    return JSONResponse(error_body(message, "invalid_request_error"), status_code=exc.status_code)


class _RequireKey:
    """Every /v1 request needs `Authorization: Bearer KEY`; checked before the body is read."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                body = error_body(
                    "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                    "invalid_request_error",
                    None,
                    "invalid_api_key",
                )
                response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class _LimitBody:
    """Reads the whole body first and answers 413 past `limit` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        body, more = b"", not (declared.isdigit() and int(declared) > self.limit)
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False) and len(body) <= self.limit
        if len(body) > self.limit or (declared.isdigit() and int(declared) > self.limit):
            message = f"request body is over this server's limit of {self.limit} bytes"
            response = JSONResponse(
                error_body(message, "invalid_request_error", None, "request_too_large"), 413
            )
            return await response(scope, receive, send)
        replayed = False

        async def replay() -> ASGIMessage:
            nonlocal replayed
            if replayed:
                return await receive()  # later calls wait for the client to disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def create_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        yield
        await engine.stop()  # uvicorn has already waited for in-flight requests; this drains the queue

    app = FastAPI(title="tunelab serve", lifespan=lifespan)
    app.state.engine, app.state.settings = engine, settings
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", get_model, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.add_middleware(_LimitBody, limit=settings.max_body_bytes)
    if settings.api_key:  # added after = outside the body limit: a request without the key is not read
        app.add_middleware(_RequireKey, key=settings.api_key)
    if settings.cors_origins:  # added last = outermost, so preflight requests never meet the key check
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app
