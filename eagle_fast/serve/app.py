"""The FastAPI application: OpenAI-compatible chat completions, model list, health, the chat page.

    app = create_app(ServeConfig(model="ckpt/"))                     # loads the model
    app = create_app(config, model=m, tokenizer=t, processor=p)      # or serves one already loaded

Routes: POST /v1/chat/completions (streamed as server-sent events or whole), GET /v1/models,
GET /health (status and generation counters; never needs the key), GET /metrics (Prometheus
text: running / waiting requests, tokens/s, cache hit rates, latency histograms), GET / (the chat page) and
/static/* (its files). With `api_key` set, the /v1 routes need `Authorization: Bearer <key>`; the
page itself holds no data and loads without it, then asks the user for the key.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from eagle_fast.serve import protocol
from eagle_fast.serve.config import ServeConfig
from eagle_fast.serve.errors import APIError, bad_request
from eagle_fast.serve.generation import Generator, Job
from eagle_fast.serve.request import parse_chat_request

log = logging.getLogger("eagle_fast.serve")
STATIC = resources.files("eagle_fast.serve") / "static"
# the page loads nothing from elsewhere and runs no inline script
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class _EventStream(StreamingResponse):
    """A streamed response that always closes its body iterator, so a generation whose client went
    away while a chunk was being sent (not only while one was generated) frees its slot at once;
    `on_close` then settles a job whose body never started (the client left before the first byte)."""

    def __init__(self, *args, on_close=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            if self.on_close is not None:
                self.on_close()


async def _read_json(request: Request, limit: int):
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(
            413, f"request body of {declared} bytes exceeds the limit of {limit} bytes", code="request_too_large"
        )
    body, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:  # chunked uploads declare no length: count as they arrive
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        body.append(part)
    try:
        return json.loads(b"".join(body))
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON ({exc})", None, "invalid_json") from None


def _authorizer(config: ServeConfig):
    key = config.api_key.encode() if config.api_key else None

    async def check(request: Request) -> None:
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise APIError(
                401, "missing or invalid API key: send the header Authorization: Bearer <key>", code="invalid_api_key"
            )

    return check


async def _events(generator: Generator, job: Job, request: Request, reply: protocol.Reply, with_usage: bool):
    yield protocol.sse(protocol.chunk(reply, {"role": "assistant", "content": ""}, None, with_usage))
    try:
        async with contextlib.aclosing(generator.run(job, request.is_disconnected)) as deltas:
            async for delta in deltas:
                yield protocol.sse(protocol.chunk(reply, {"content": delta}, None, with_usage))
    except APIError as exc:  # headers are sent: report in the stream, as OpenAI does
        yield protocol.sse(exc.body())
        yield protocol.DONE
        return
    if job.finish_reason is None:  # the client is gone
        return
    yield protocol.sse(protocol.chunk(reply, {}, job.finish_reason, with_usage))
    if with_usage:
        yield protocol.sse(protocol.usage_chunk(reply, protocol.usage(job.prompt_tokens, len(job.tokens))))
    yield protocol.DONE


def create_app(config: ServeConfig, model=None, tokenizer=None, processor=None) -> FastAPI:
    """The app serving `model` (with its tokenizer and processor), or config.model loaded with
    load_model when no model is given."""
    config.validate()
    if model is None:
        from eagle_fast.inference import load_model

        model, tokenizer, processor = load_model(config.model, dtype=config.dtype, device=config.device)
    generator = Generator(model, tokenizer, processor, config)
    name, started = config.served_name(), int(time.time())
    app = FastAPI(title="eagle_fast", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config, app.state.generator = config, generator
    authorized = [Depends(_authorizer(config))]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), code=None).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return bad_request(str(exc.errors()[:3]), None, "invalid_request").response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.exception("request failed")
        return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, **generator.stats()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generator.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=authorized)
    async def models():
        card = {"id": name, "object": "model", "created": started, "owned_by": "eagle_fast"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request):
        req = parse_chat_request(await _read_json(request, config.max_body_bytes), config)
        job = await generator.prepare(req)
        generator.admit(job)  # a full queue is a 429 before the response starts
        reply = protocol.Reply(model=name)
        if req.stream:
            events = _events(generator, job, request, reply, req.include_usage)
            return _EventStream(
                events,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                on_close=lambda: generator.abandon(job),
            )
        async with contextlib.aclosing(generator.run(job, request.is_disconnected)) as deltas:
            text = "".join([d async for d in deltas])
        use = protocol.usage(job.prompt_tokens, len(job.tokens))
        return JSONResponse(protocol.completion(reply, text, job.finish_reason or "stop", use))

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(STATIC / "index.html"), headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app
