"""The OpenAI-compatible HTTP API over the domain service: `GET /v1/models`, `POST /v1/completions`
and `POST /v1/chat/completions` (JSON, or server-sent events with `stream`), plus lens-serve's
sessions under `/v1/lens/sessions`. lens-serve's options travel in the body's `lens` object.

It mirrors the gRPC servicer and interceptor: the same bearer tokens and owners
(`auth.authorize`), the same error map (`statuses.failure_of`, in OpenAI's error body, `param`
naming the field), the same metrics (`grpc_service` "http", `grpc_method` "METHOD /route") and
the same spans. No gRPC types here."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence
from contextlib import aclosing
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lens_serve import metrics, tracing
from lens_serve.aio import cancel_and_wait
from lens_serve.errors import InvalidRequest, LimitExceeded, NotFound, echo
from lens_serve.http.protocol import ChatCompletionRequest, CompletionRequest
from lens_serve.http.responses import (
    ChatFormat,
    Choice,
    CompletionFormat,
    Json,
    ResponseFormat,
    usage_json,
)
from lens_serve.service import auth
from lens_serve.service.lens_service import LensService
from lens_serve.service.requests import GenerateEvent, GenerateInput
from lens_serve.service.statuses import Failure, failure_of
from lens_serve.store.sessions import SessionInfo

logger = logging.getLogger(__name__)

STATUS_SCOPE_KEY = "lens.status"
"""Where a request's scope records the status it failed with, for `lens_rpc_errors_total`."""
METRICS_SERVICE = "http"
"""The `grpc_service` label of this endpoint's calls (their `grpc_method` is `METHOD /route`)."""
_LENS_FIELDS = frozenset({"session_id", "wc_budget", "policy", "idempotency_key"})
"""Request fields that travel in the body's `lens` object."""
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
"""OpenAI's error `type` for an HTTP status (others: server_error for 5xx, else
invalid_request_error)."""


class ModelNotFound(NotFound):
    """The request names a model this server does not serve."""

    field = "model"


class AppendBody(BaseModel):
    """POST /v1/lens/sessions/{session_id}/append: text or token ids to append."""

    model_config = ConfigDict(extra="forbid")

    text: str = ""
    token_ids: list[int] = []
    idempotency_key: str = ""
    """Makes the append safe to retry (docs/design.md §7)."""


class _Route(APIRoute):
    """A route whose every error, request validation included, is answered with the status the one
    error map gives it, in OpenAI's error body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_errors(request: Request) -> Response:
            try:
                return await handle(request)
            except Exception as exc:
                return error_response(exc, request.scope)

        return handle_errors


def _service(request: Request) -> LensService:
    service: LensService = request.app.state.service
    return service


def _caller(request: Request) -> str:
    """The owner of the call, from its bearer token, as gRPC's interceptor finds it (HTTP paths
    are LensServe calls to it: they need one of the API tokens)."""
    header = request.headers.get(auth.AUTH_METADATA_KEY)
    metadata = [] if header is None else [(auth.AUTH_METADATA_KEY, header)]
    return auth.authorize(request.url.path, metadata, _service(request).settings)


Owner = Annotated[str, Depends(_caller)]
Service = Annotated[LensService, Depends(_service)]
router = APIRouter(route_class=_Route)


def build_app(service: LensService) -> FastAPI:
    """The API for `service`, with its settings' tokens and limits; `settings.model` is the one
    model id it serves."""
    app = FastAPI(title="lens-serve", docs_url=None, redoc_url=None)  # no UIs: they fetch scripts
    app.state.service = service
    app.state.created = int(time.time())
    app.include_router(router)
    max_body_bytes = service.settings.max_message_bytes  # gRPC's message limit
    app.add_middleware(_Observed, routes=app.router.routes, max_body_bytes=max_body_bytes)
    return app


@router.get("/v1/models")
async def models(owner: Owner, service: Service, request: Request) -> Json:
    model = {
        "id": service.settings.model,
        "object": "model",
        "created": request.app.state.created,
        "owned_by": "lens-serve",
        "max_model_len": service.engine.max_model_len,
    }
    return {"object": "list", "data": [model]}


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest, owner: Owner, service: Service, request: Request
) -> Response:
    _check_model(body.model, service.settings.model)
    generation = _Generation(service, owner, body.generate_input(), body.n)
    response_format = CompletionFormat(with_logprobs=body.logprobs is not None)
    return await generation.respond(body, response_format, request.scope)


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, owner: Owner, service: Service, request: Request
) -> Response:
    _check_model(body.model, service.settings.model)
    generation = _Generation(service, owner, body.generate_input(), body.n)
    return await generation.respond(body, ChatFormat(with_logprobs=body.logprobs), request.scope)


@router.post("/v1/lens/sessions")
async def create_session(owner: Owner, service: Service) -> Json:
    return _session(await service.create_session(owner), levels=0)


@router.get("/v1/lens/sessions/{session_id}")
async def get_session(session_id: str, owner: Owner, service: Service) -> Json:
    info, levels = await service.get_session(owner, session_id)
    return _session(info, levels)


@router.delete("/v1/lens/sessions/{session_id}")
async def delete_session(session_id: str, owner: Owner, service: Service) -> Json:
    await service.delete_session(owner, session_id)
    return {"id": session_id, "object": "lens.session.deleted", "deleted": True}


@router.post("/v1/lens/sessions/{session_id}/append")
async def append(session_id: str, body: AppendBody, owner: Owner, service: Service) -> Json:
    if body.text and body.token_ids:
        raise InvalidRequest("text", "give text or token_ids, not both")
    part: str | list[int] = body.token_ids or body.text
    lifetime, appended = await service.append(owner, session_id, [part], body.idempotency_key)
    return {
        "id": session_id,
        "object": "lens.session",
        "lifetime_tokens": lifetime,
        "appended_tokens": appended,
    }


def _check_model(asked: str, served: str) -> None:
    if asked != served:
        raise ModelNotFound(f"model {echo(asked)} is not served here; /v1/models lists {served!r}")


def _session(info: SessionInfo, levels: int) -> Json:
    return {
        "id": info.session_id,
        "object": "lens.session",
        "lifetime_tokens": info.lifetime_tokens,
        "levels": levels,
        "created_at": int(info.created_at),
    }


# --------------------------------------------------------------------------------------------------
# Generation


class _Generation:
    """One completions or chat completions call: its `n` choices generated together, answered as
    one JSON body or as server-sent events."""

    def __init__(self, service: LensService, owner: str, request: GenerateInput, n: int) -> None:
        self._session_id = request.session_id
        sampling = request.sampling
        # With a seed, choice i uses seed + i: reproducible, yet the choices differ.
        choices = [
            dataclasses.replace(
                request, sampling=dataclasses.replace(sampling, seed=sampling.seed + i)
            )
            if sampling.seed
            else request
            for i in range(n)
        ]
        self._events = _indexed([service.generate(owner, choice) for choice in choices])
        self._n = n
        self._created = int(time.time())

    async def respond(
        self,
        body: CompletionRequest | ChatCompletionRequest,
        response_format: ResponseFormat,
        scope: Scope,
    ) -> Response:
        envelope = {"created": self._created, "model": body.model}
        if not body.stream:
            async with aclosing(self._events) as events:
                choices = [Choice() for _ in range(self._n)]
                request_id = ""
                async for index, event in events:
                    request_id = request_id or event.request_id
                    choices[index].add(event)
            return JSONResponse(
                {
                    "id": response_format.id_prefix + request_id,
                    "object": response_format.object,
                    **envelope,
                    "choices": [response_format.choice(i, c) for i, c in enumerate(choices)],
                    "usage": usage_json(choices, self._session_id),
                }
            )
        # Errors before the first token (validation, an unknown session, overload) get their HTTP
        # status: the stream starts only once there is something to send.
        try:
            first = await anext(self._events)
        except BaseException:
            await self._events.aclose()
            raise
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        stream = self._stream(first, response_format, envelope, include_usage, scope)
        return StreamingResponse(stream, media_type="text/event-stream")

    async def _stream(
        self,
        first: tuple[int, GenerateEvent],
        response_format: ResponseFormat,
        envelope: Json,
        include_usage: bool,
        scope: Scope,
    ) -> AsyncGenerator[str, None]:
        head = {
            "id": response_format.id_prefix + first[1].request_id,
            "object": response_format.chunk_object,
            **envelope,
        }
        choices = [Choice() for _ in range(self._n)]
        async with aclosing(self._events) as events:
            try:
                async for index, event in _prepend(first, events):
                    choices[index].add(event)
                    chunk = response_format.chunk(
                        index, event.text, event.logprobs or [], event.finish_reason
                    )
                    yield _sse({**head, "choices": [chunk]})
                if include_usage:
                    usage = usage_json(choices, self._session_id)
                    yield _sse({**head, "choices": [], "usage": usage})
            except asyncio.CancelledError:  # the client went away
                scope[STATUS_SCOPE_KEY] = "CANCELLED"
                raise
            except Exception as exc:
                # The stream has begun (status 200): the error is its last event, as OpenAI's
                # and vLLM's servers send it, and the SDKs raise it.
                yield _sse(_error_json(_failure(exc, _label(scope), scope)))
        yield "data: [DONE]\n\n"


async def _prepend(
    first: tuple[int, GenerateEvent], rest: AsyncIterator[tuple[int, GenerateEvent]]
) -> AsyncIterator[tuple[int, GenerateEvent]]:
    yield first
    async for item in rest:
        yield item


async def _indexed(
    streams: Sequence[AsyncGenerator[GenerateEvent, None]],
) -> AsyncGenerator[tuple[int, GenerateEvent], None]:
    """Every choice's events as they come, with the choice's index. One choice is read in this
    task; several each in a task of its own, all closed (their engine requests aborted) when this
    generator is."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as stream:
            async for event in stream:
                yield 0, event
        return
    queue: asyncio.Queue[tuple[int, GenerateEvent | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[GenerateEvent, None]) -> None:
        try:
            async with aclosing(stream):
                async for event in stream:
                    await queue.put((index, event))
        except Exception as exc:
            await queue.put((index, exc))
        else:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        await cancel_and_wait(tasks)


def _sse(payload: Json) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


# --------------------------------------------------------------------------------------------------
# Errors and metrics


def error_response(exc: Exception, scope: Scope) -> JSONResponse:
    failure = _failure(exc, _label(scope), scope)
    # RFC 9110: a 401 names the scheme it wants.
    headers = {"WWW-Authenticate": "Bearer"} if failure.http_status == 401 else None
    return JSONResponse(_error_json(failure), status_code=failure.http_status, headers=headers)


def _failure(exc: Exception, label: str, scope: Scope) -> Failure:
    """The error map's failure for `exc`, its field named as the HTTP request names it; recorded
    in `scope` for the metrics."""
    if isinstance(exc, RequestValidationError):
        exc = _invalid_body(exc)
    failure = failure_of(exc, label, logger)
    scope[STATUS_SCOPE_KEY] = failure.status
    field = failure.field
    param = _param(field, label)
    if field is None or param is None or param == field:
        return failure
    message = failure.message
    if message.startswith(f"{field}:"):  # InvalidRequest's "<field>: <problem>"
        message = param + message[len(field) :]
    return dataclasses.replace(failure, field=param, message=message)


def _invalid_body(exc: RequestValidationError) -> InvalidRequest:
    """The first problem pydantic found in a body, as the service would name it."""
    error = exc.errors()[0] if exc.errors() else {}
    if error.get("type") == "json_invalid":
        return InvalidRequest("body", f"not JSON: {error.get('msg', '')}")
    field = ""
    for part in error.get("loc", ())[1:]:  # the first part says where: body, path, header
        field += f"[{part}]" if isinstance(part, int) else f".{part}" if field else str(part)
    return InvalidRequest(field or "body", str(error.get("msg", "invalid")))


def _param(field: str | None, label: str) -> str | None:
    """The HTTP name of a field the service names (`sampling.top_p` -> `top_p`, `session_id` ->
    `lens.session_id`)."""
    if field is None or not label.endswith("completions"):
        return field
    name = field.removeprefix("sampling.")
    if name in _LENS_FIELDS:
        return f"lens.{name}"
    if name == "prompt_token_ids":
        return "prompt"
    if name == "logprobs" and label.endswith("/chat/completions"):
        return "top_logprobs"
    return name


def _error_json(failure: Failure) -> Json:
    status = failure.http_status
    default = "server_error" if status >= 500 else "invalid_request_error"
    error_type = _ERROR_TYPES.get(status, default)
    return {
        "error": {
            "message": failure.message,
            "type": error_type,
            "param": failure.field,
            "code": failure.status,
        }
    }


def _label(scope: Scope) -> str:
    """`METHOD /route` (the route's template, so session ids make no new label values)."""
    route = scope.get("route")
    path = route.path if isinstance(route, APIRoute) else scope.get("path", "")
    return f"{scope.get('method', '')} {path}"


class _Observed:
    """ASGI middleware: counts (`lens_rpc_started_total`), times (`lens_rpc_latency_seconds`) and
    traces every API call, counts the failed ones (`lens_rpc_errors_total`, by gRPC status name),
    and refuses a body over `max_body_bytes` (`LimitExceeded`) before anything parses it. Paths
    that match no route are left alone."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute], max_body_bytes: int) -> None:
        self._app = app
        self._routes = routes
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._route(scope)
        if route is None:
            await self._app(scope, receive, send)
            return
        label = f"{scope['method']} {route.path}"
        metrics.RPC_STARTED_TOTAL.labels(METRICS_SERVICE, label).inc()
        start = time.perf_counter()
        # OpenTelemetry's HTTP server conventions: the span is named after the route.
        attributes = {"http.request.method": scope["method"], "http.route": route.path}
        with tracing.request_span(label, attributes, scope["headers"]) as span:
            try:
                body = await self._body(receive)
                if body is None:  # the client left while sending it
                    return
                if len(body) > self._max_body_bytes:
                    problem = f"a request body may carry at most {self._max_body_bytes} bytes"
                    scope["route"] = route
                    refusal = error_response(LimitExceeded("body", problem), scope)
                    await refusal(scope, receive, send)
                    return
                await self._app(scope, _replay(body, receive), send)
            finally:
                elapsed = time.perf_counter() - start
                metrics.RPC_LATENCY_SECONDS.labels(METRICS_SERVICE, label).observe(elapsed)
                status = scope.get(STATUS_SCOPE_KEY)
                if status is not None:
                    metrics.RPC_ERRORS_TOTAL.labels(METRICS_SERVICE, label, status).inc()
                    tracing.set_failed(span, status)

    def _route(self, scope: Scope) -> APIRoute | None:
        if scope["type"] != "http":
            return None
        for route in self._routes:
            if isinstance(route, APIRoute) and route.matches(scope)[0] is Match.FULL:
                return route
        return None

    async def _body(self, receive: Receive) -> bytes | None:
        """The whole body, or as much of it as shows it is too large; None on a disconnect."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > self._max_body_bytes or not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app: the body read already, then the client's own messages (a
    disconnect ends a stream)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
