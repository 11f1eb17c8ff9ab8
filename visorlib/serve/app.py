"""The HTTP side: FastAPI routes in the OpenAI shape, around one :class:`~visorlib.serve.scheduler.Scheduler`.

A chat completion goes: body read with a size limit -> JSON -> :func:`parse_chat_request` ->
images decoded (:mod:`.media`) and the prompt processed (:mod:`.prepare`) in a worker thread ->
queued in the scheduler -> events back through an asyncio queue, answered as one JSON response or
as server-sent events. Any failure before the first token is an HTTP error with an OpenAI error
body; a streaming request is answered with its status only once its first event is known, so a
request the model refuses is still a 400, not a 200 stream with an error inside.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .media import MediaPolicy, load_images
from .metrics import Metrics
from .prepare import prepare, reserved_markers
from .protocol import APIError, parse_chat_request
from .scheduler import Scheduler

log = logging.getLogger("visorlib.serve")


@dataclass
class ServerOptions:
    """The operator's settings (``visorlib serve`` flags).

    Attributes:
        served_name: The model name clients pass as ``model``.
        max_batch: Most sequences decoded together.
        max_queue: Most requests waiting for a place (then 429).
        max_model_len: Longest prompt + answer, in tokens.
        default_max_tokens: ``max_tokens`` when a request gives none.
        max_body_bytes: Largest request body.
        max_images: Most images in one request.
        api_key: Bearer token every ``/v1`` call must carry; None: no authentication.
        media: Where images may come from (:class:`~visorlib.serve.media.MediaPolicy`).
    """

    served_name: str
    max_batch: int = 32
    max_queue: int = 256
    max_model_len: int = 4096
    default_max_tokens: int = 256
    max_body_bytes: int = 32 << 20
    max_images: int = 8
    api_key: str | None = None
    media: MediaPolicy = MediaPolicy()


def create_app(model, processor, options: ServerOptions) -> FastAPI:
    """The ASGI application serving ``model``; the scheduler thread starts and stops with it."""
    metrics = Metrics()
    scheduler = Scheduler(model, processor, options.max_batch, options.max_queue, metrics)
    markers = reserved_markers(processor)
    created = int(time.time())
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        state["ready"] = True
        yield
        # Uvicorn has finished (or timed out) the in-flight requests by now: stop the loop.
        state["ready"] = False
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="visorlib serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        metrics.requests["rejected" if err.status < 500 else "error"] += 1
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return JSONResponse(APIError(str(err.detail), None, err.status_code).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.exception("unhandled error")
        metrics.requests["error"] += 1
        return JSONResponse(APIError(f"internal error: {type(err).__name__}", None, 500).body(), status_code=500)

    def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), options.api_key.encode()):
            raise APIError("missing or wrong API key (send 'Authorization: Bearer <key>')", None, 401,
                           "invalid_api_key")

    @app.get("/health")
    async def health():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Readiness: the model is loaded and the scheduler is taking requests."""
        if state["ready"] and scheduler.alive:
            return {"status": "ready", "model": options.served_name}
        return JSONResponse({"status": "not ready"}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(options.served_name), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        plan = model.plan
        visor = None if plan.dense else {
            "configurations": plan.configurations, "default": plan.default, "router": model.router is not None}
        return {"object": "list", "data": [{"id": options.served_name, "object": "model", "created": created,
                                            "owned_by": "visorlib", "max_model_len": options.max_model_len,
                                            "visor": visor}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        if not state["ready"]:
            raise APIError("the server is not ready", None, 503)
        body = await _read_json(request, options.max_body_bytes)
        chat = parse_chat_request(body, options.served_name, markers)
        if len(chat.images) > options.max_images:
            raise APIError(f"the request holds {len(chat.images)} images; this server accepts at most "
                           f"{options.max_images} (--max-images)", "messages")

        def work():
            images = load_images(chat.images, options.media)
            return prepare(model, processor, chat, images, options.max_model_len, options.default_max_tokens)

        prepared = await asyncio.to_thread(work)
        events: asyncio.Queue = asyncio.Queue()
        seq = scheduler.submit(prepared, asyncio.get_running_loop(), events)
        reply = _Reply(options.served_name, chat.include_usage, metrics)
        try:
            first = await _next_event(events, request, seq)
        except BaseException:
            seq.cancel()
            raise
        if first is None:  # the client left while waiting
            return JSONResponse({}, status_code=499)
        if first[0] == "error":
            raise first[1]
        if chat.stream:
            return StreamingResponse(reply.stream(first, events, seq), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, event = "", first
        while True:
            if event[0] == "delta":
                text += event[1]
            elif event[0] == "done":
                return reply.completion(text, event[1], event[2])
            elif event[0] == "error":
                raise event[1]
            event = await _next_event(events, request, seq)
            if event is None:
                return JSONResponse({}, status_code=499)

    return app


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON, read with a size limit (a 413 past it, a 400 naming the problem if not JSON)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(f"the request body is {int(declared):,} bytes; this server accepts at most {limit:,} "
                       "(--max-body-bytes)", None, 413)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise APIError(f"the request body is larger than {limit:,} bytes (--max-body-bytes)", None, 413)
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(f"the request body is not valid JSON: {err}", "body") from None


async def _next_event(events: asyncio.Queue, request: Request, seq) -> tuple | None:
    """The next scheduler event; None (and the sequence cancelled) once the client has disconnected."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                seq.cancel()
                return None


class _Reply:
    """OpenAI response objects for one request."""

    def __init__(self, model: str, include_usage: bool, metrics: Metrics):
        self.metrics = metrics
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.include_usage = model, include_usage

    def completion(self, text: str, finish_reason: str, usage: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish_reason, "logprobs": None}],
                "usage": usage}

    def chunk(self, delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                              "logprobs": None}]}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    async def stream(self, first: tuple, events: asyncio.Queue, seq):
        """Server-sent events: a role chunk, content chunks, a finish chunk, usage (if asked), ``[DONE]``.

        If the client disconnects, Starlette cancels this generator; the ``finally`` cancels the
        sequence so its batch row is freed at the next decode step.
        """
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            event = first
            while True:
                if event[0] == "started":
                    pass  # the role chunk above went out with it
                elif event[0] == "delta":
                    yield self.chunk({"content": event[1]})
                elif event[0] == "done":
                    yield self.chunk({}, event[1])
                    if self.include_usage:
                        yield self.chunk({}, usage=event[2])
                    break
                else:  # an error after the stream began: OpenAI-style error data, then the end
                    self.metrics.requests["error"] += 1
                    yield f"data: {json.dumps(event[1].body())}\n\n"
                    break
                event = await events.get()
            yield "data: [DONE]\n\n"
        finally:
            seq.cancel()  # no-op once finished; frees the row when the client went away
