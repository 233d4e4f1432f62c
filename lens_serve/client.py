"""Python clients of a lens-serve server: `LensClient` (asyncio, grpc.aio) and `SyncLensClient`
(blocking, gRPC's own sync channel). Both have the same methods and take policies by name::

    async with LensClient("127.0.0.1:50051", token="...") as client:
        session = await client.create_session()
        await client.append(session.session_id, text=long_document)
        async for chunk in client.generate("Summarize.", session_id=session.session_id):
            print(chunk.text, end="")

Production defaults: a gRPC service config (`round_robin` over every resolved address, e.g. the
pods behind `dns:///lens-serve-headless...`; gRPC retries the idempotent unary calls on
UNAVAILABLE), keepalive pings, a deadline on every call (`timeout`, `stream_timeout`, or `timeout=`
per call), and typed errors: every method raises a `LensError` subclass (a `grpc.aio.AioRpcError`,
so existing `except grpc.RpcError` code still works) carrying the server's `google.rpc` details:
`InvalidArgument.field`, `ResourceExhausted.retry_after`. Append and a session's Generate are
retried by the client itself on UNAVAILABLE or DEADLINE_EXCEEDED only when given an
`idempotency_key` (Generate only before its first chunk arrived): the key makes a retried write
apply once (docs/design.md §7).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Generator, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2

from lens_serve.policy_names import policy_value
from lens_serve.v1 import lens_serve_pb2 as pb
from lens_serve.v1 import lens_serve_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
"""Matches the server's default `max_message_bytes`."""
# 256 Ki characters are at most 1 MiB of UTF-8, far below the message limit, and large enough that
# a 1M-token document takes a few dozen messages.
DEFAULT_CHUNK_CHARS = 1 << 18
# 256 Ki token ids (varint-packed int32s, at most 5 bytes each) stay near 1 MiB per message too.
DEFAULT_CHUNK_TOKENS = 1 << 18

_Metadata = tuple[tuple[str, str], ...]


def _auth(token: str | None) -> _Metadata:
    return (("authorization", f"Bearer {token}"),) if token else ()


DEFAULT_TIMEOUT_S = 60.0
"""Deadline of a unary call (and of Append), unless the client or the call says otherwise."""
DEFAULT_STREAM_TIMEOUT_S = 600.0
"""Deadline of a Generate stream: a long completion."""
DEFAULT_RETRY_ATTEMPTS = 4
"""Attempts (the first included) of a retried call: gRPC's retries of the idempotent unary calls,
the client's own of keyed Append/Generate."""
DEFAULT_KEEPALIVE_TIME_S = 30.0
"""Ping an idle connection this often; the server accepts pings every 10 s
(`LENS_MIN_CLIENT_PING_INTERVAL_S`), also without calls."""
DEFAULT_KEEPALIVE_TIMEOUT_S = 10.0

_SERVICE = "lens_serve.v1.LensServe"
_RETRIED_METHODS = ("GetSession", "GetWorkingContext", "Score", "DeleteSession")
"""Idempotent in effect: gRPC may send them again. Not CreateSession (a retry makes a second
session), nor the streams (gRPC never retries those once a message went; see the keyed retries)."""
_RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_INITIAL_BACKOFF_S = 0.1
_MAX_BACKOFF_S = 2.0


def service_config(
    *, load_balancing: str = "round_robin", retry_attempts: int = DEFAULT_RETRY_ATTEMPTS
) -> dict[str, Any]:
    """The default gRPC service config: `load_balancing` over every resolved address, and
    `retry_attempts` attempts with exponential backoff on UNAVAILABLE for the idempotent unary
    calls (`retry_attempts` 1: no retries)."""
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    if retry_attempts > 1:
        config["methodConfig"] = [
            {
                "name": [{"service": _SERVICE, "method": m} for m in _RETRIED_METHODS],
                "retryPolicy": {
                    "maxAttempts": min(retry_attempts, 5),  # gRPC caps it at 5
                    "initialBackoff": f"{_INITIAL_BACKOFF_S}s",
                    "maxBackoff": f"{_MAX_BACKOFF_S}s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return config


def _channel_options(
    max_message_bytes: int,
    config: Mapping[str, Any],
    keepalive_time_s: float,
    keepalive_timeout_s: float,
    options: Sequence[tuple[str, Any]],
) -> list[tuple[str, Any]]:
    # Same limits as the server, in both directions, so a long Score text is not refused locally.
    # `options` come last: gRPC takes the last value of an option given twice.
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.service_config", json.dumps(config)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", round(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        *options,
    ]


def _backoff_s(attempt: int) -> float:
    """Before retry number `attempt` (1 for the first retry)."""
    return float(min(_INITIAL_BACKOFF_S * 2 ** (attempt - 1), _MAX_BACKOFF_S))


class LensError(grpc.aio.AioRpcError):
    """A failed call: `code()`, `details()` (the server's message) and `status`, the
    `google.rpc.Status` the server attached (None when it sent none: a deadline, a refused
    connection). A `grpc.aio.AioRpcError`, so `except grpc.RpcError` catches it, from either
    client."""

    def __init__(self, error: grpc.RpcError) -> None:
        code, details, trailing = _parts(error)
        super().__init__(code, None, trailing, details, None)
        self.status = _status_of(trailing)

    def _details_of(self, kind: type[Any]) -> list[Any]:
        found = []
        for packed in self.status.details if self.status is not None else ():
            if packed.Is(kind.DESCRIPTOR):
                detail = kind()
                packed.Unpack(detail)
                found.append(detail)
        return found

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """(field, description) of the `google.rpc.BadRequest` details."""
        return [
            (v.field, v.description)
            for bad in self._details_of(error_details_pb2.BadRequest)
            for v in bad.field_violations
        ]

    @property
    def field(self) -> str | None:
        """The request field at fault, when the server named one."""
        violations = self.field_violations
        return violations[0][0] if violations else None


class InvalidArgument(LensError):
    """A bad field (`field`, `field_violations`): fix the request, do not retry."""


class NotFound(LensError):
    """Unknown or expired session: create a new one and re-append."""


class ResourceExhausted(LensError):
    """The server is full (`retry_after` seconds: back off and retry) or the request is over a size
    limit (`retry_after` None, `field` named: send less)."""

    @property
    def retry_after(self) -> float | None:
        for info in self._details_of(error_details_pb2.RetryInfo):
            return float(info.retry_delay.ToNanoseconds() / 1e9)
        return None


class Unavailable(LensError):
    """Not ready, draining, storage unreachable: retry (with the same idempotency key)."""


class DeadlineExceeded(LensError):
    """The call ran past its deadline: retry (with the same idempotency key)."""


class Unauthenticated(LensError):
    """Missing or unknown bearer token."""


class PermissionDenied(LensError):
    """A LensServe token calling LensAdmin."""


class Internal(LensError):
    """A lens-serve bug; the message carries an error id found in the server log."""


_ERRORS: dict[grpc.StatusCode, type[LensError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INTERNAL: Internal,
}
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def _parts(error: grpc.RpcError) -> tuple[grpc.StatusCode, str | None, Any]:
    # Both the aio error and the sync one (a grpc.Call) have these methods; RpcError declares none.
    call: Any = error
    return call.code(), call.details(), call.trailing_metadata()


def _status_of(trailing: Any) -> status_pb2.Status | None:
    for key, value in trailing or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # a malformed detail must not hide the status itself
                return None
    return None


def lens_error(error: grpc.RpcError) -> LensError:
    """The typed error of a failed call (`error` itself when it already is one)."""
    if isinstance(error, LensError):
        return error
    return _ERRORS.get(_parts(error)[0], LensError)(error)


@contextlib.contextmanager
def _typed() -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as e:
        if isinstance(e, LensError):
            raise
        raise lens_error(e) from e


def _credentials(tls: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    if root_certificates is None and not tls:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def _append_requests(
    session_id: str,
    text: str | None,
    token_ids: Sequence[int] | None,
    chunk_chars: int,
    chunk_tokens: int,
    idempotency_key: str = "",
) -> Iterator[pb.AppendRequest]:
    """The Append stream: the session id (and idempotency key) on the first chunk only, then text
    or id chunks. Arguments are checked before the first chunk is produced (`_check_append`)."""
    _check_append(text, token_ids, chunk_chars, chunk_tokens)
    return _append_chunks(
        pb.AppendRequest(session_id=session_id, idempotency_key=idempotency_key),
        text,
        token_ids,
        chunk_chars,
        chunk_tokens,
    )


def _check_append(
    text: str | None, token_ids: Sequence[int] | None, chunk_chars: int, chunk_tokens: int
) -> None:
    if (text is None) == (token_ids is None):
        raise ValueError("append: give exactly one of text or token_ids")
    if chunk_chars < 1:
        raise ValueError("chunk_chars: must be positive")
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens: must be positive")


def _append_chunks(
    head: pb.AppendRequest,
    text: str | None,
    token_ids: Sequence[int] | None,
    chunk_chars: int,
    chunk_tokens: int,
) -> Iterator[pb.AppendRequest]:
    """`head`'s fields (session id, key) go on the first chunk only."""
    if text is not None:
        for start in range(0, max(len(text), 1), chunk_chars):
            chunk = pb.AppendRequest(text=text[start : start + chunk_chars])
            if start == 0:
                chunk.MergeFrom(head)
            yield chunk
    else:
        assert token_ids is not None
        ids = list(token_ids)
        for start in range(0, max(len(ids), 1), chunk_tokens):
            chunk = pb.AppendRequest(token_ids=ids[start : start + chunk_tokens])
            if start == 0:
                chunk.MergeFrom(head)
            yield chunk


def _generate_request(
    prompt: str | Sequence[int],
    *,
    session_id: str | None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    stop: Iterable[str],
    wc_budget: int,
    policy: str | int,
    chat: bool,
    messages: Sequence[Mapping[str, str]],
    top_k: int,
    presence_penalty: float,
    frequency_penalty: float,
    repetition_penalty: float,
    logprobs: int | None,
    idempotency_key: str,
) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        session_id=session_id or "",
        idempotency_key=idempotency_key,
        sampling=pb.SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=list(stop),
            top_k=top_k,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty,
            logprobs=logprobs,
        ),
        wc_budget=wc_budget,
        policy=policy_value(policy),
        chat=chat,
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
    )
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.extend(prompt)
    return request


def _set_query(
    request: pb.ScoreRequest | pb.GetWorkingContextRequest, query: str | Sequence[int]
) -> None:
    if isinstance(query, str):
        request.query = query
    else:
        request.query_token_ids.extend(query)


def _working_context_request(
    session_id: str, *, wc_budget: int, policy: str | int, query: str | Sequence[int]
) -> pb.GetWorkingContextRequest:
    request = pb.GetWorkingContextRequest(
        session_id=session_id, wc_budget=wc_budget, policy=policy_value(policy)
    )
    _set_query(request, query)
    return request


def _score_request(
    continuation: str | Sequence[int],
    *,
    session_id: str | None,
    context: str | Sequence[int],
    wc_budget: int,
    policy: str | int,
    query: str | Sequence[int],
) -> pb.ScoreRequest:
    request = pb.ScoreRequest(
        session_id=session_id or "", wc_budget=wc_budget, policy=policy_value(policy)
    )
    _set_query(request, query)
    if isinstance(context, str):
        request.context = context
    else:
        request.context_token_ids.extend(context)
    if isinstance(continuation, str):
        request.continuation = continuation
    else:
        request.continuation_token_ids.extend(continuation)
    return request


class LensClient:
    """Asyncio client. Create it inside the event loop that uses it; close with `close()` or
    `async with`. `token` authenticates LensServe calls, `admin_token` LensAdmin calls; TLS when
    `tls` or `root_certificates` (PEM bytes) is given. `timeout` (seconds, None: none) bounds each
    unary call and Append, `stream_timeout` a Generate stream; a method's own `timeout` overrides
    them for one call. `retry_attempts` bounds retries (1: none), `load_balancing` names the gRPC
    policy, `keepalive_*` the pings, `options` are extra channel options (they override the
    others), `interceptors` grpc.aio client interceptors (tracing, tests). Every method raises a
    `LensError` subclass when the call fails."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        admin_token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        stream_timeout: float | None = DEFAULT_STREAM_TIMEOUT_S,
        retry_attempts: int = DEFAULT_RETRY_ATTEMPTS,
        load_balancing: str = "round_robin",
        keepalive_time_s: float = DEFAULT_KEEPALIVE_TIME_S,
        keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S,
        options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        config = service_config(load_balancing=load_balancing, retry_attempts=retry_attempts)
        options = _channel_options(
            max_message_bytes, config, keepalive_time_s, keepalive_timeout_s, options
        )
        credentials = _credentials(tls, root_certificates)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
        )
        self._stub = pb_grpc.LensServeStub(self._channel)
        self._admin = pb_grpc.LensAdminStub(self._channel)
        self._metadata = _auth(token)
        self._admin_metadata = _auth(admin_token)
        self._timeout = timeout
        self._stream_timeout = stream_timeout
        self._retry_attempts = max(retry_attempts, 1)

    def _deadline(self, timeout: float | None, stream: bool = False) -> float | None:
        if timeout is not None:
            return timeout
        return self._stream_timeout if stream else self._timeout

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def create_session(self, *, timeout: float | None = None) -> pb.Session:
        with _typed():
            return await self._stub.CreateSession(
                pb.CreateSessionRequest(), metadata=self._metadata, timeout=self._deadline(timeout)
            )

    async def delete_session(self, session_id: str, *, timeout: float | None = None) -> None:
        with _typed():
            await self._stub.DeleteSession(
                pb.DeleteSessionRequest(session_id=session_id),
                metadata=self._metadata,
                timeout=self._deadline(timeout),
            )

    async def get_session(self, session_id: str, *, timeout: float | None = None) -> pb.Session:
        with _typed():
            return await self._stub.GetSession(
                pb.GetSessionRequest(session_id=session_id),
                metadata=self._metadata,
                timeout=self._deadline(timeout),
            )

    async def append(
        self,
        session_id: str,
        text: str | None = None,
        token_ids: Sequence[int] | None = None,
        *,
        chunk_chars: int = DEFAULT_CHUNK_CHARS,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> pb.AppendResponse:
        """Appends `text` or `token_ids` (exactly one) to a session, streamed in chunks. With
        `idempotency_key`, retrying after UNAVAILABLE or DEADLINE_EXCEEDED appends once."""
        # Checked here, so argument errors raise in the caller, not in gRPC's request consumer.
        requests = _append_requests(
            session_id, text, token_ids, chunk_chars, chunk_tokens, idempotency_key
        )
        deadline = self._deadline(timeout)
        attempts = self._retry_attempts if idempotency_key else 1
        for attempt in range(1, attempts + 1):
            try:
                with _typed():
                    return await self._stub.Append(
                        requests, metadata=self._metadata, timeout=deadline
                    )
            except (Unavailable, DeadlineExceeded):
                if attempt >= attempts:
                    raise
            await asyncio.sleep(_backoff_s(attempt))
            requests = _append_requests(
                session_id, text, token_ids, chunk_chars, chunk_tokens, idempotency_key
            )
        raise AssertionError("unreachable")

    def generate(
        self,
        prompt: str | Sequence[int] = "",
        *,
        session_id: str | None = None,
        max_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 0.0,
        seed: int = 0,
        stop: Iterable[str] = (),
        wc_budget: int = 0,
        policy: str | int = "lens",
        chat: bool = False,
        messages: Sequence[Mapping[str, str]] = (),
        top_k: int = 0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 0.0,
        logprobs: int | None = None,
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Streams a completion of `prompt` (text, or token ids) or of a chat, `messages` (dicts
        with "role" and "content", rendered with the model's chat template): `async for chunk in
        client.generate(...)`. Zeros mean server defaults; the last chunk carries finish_reason and
        usage. `logprobs=N` adds each token's log-probability and the N most likely ones' to the
        chunks. Argument errors raise at the call; `aclose()` (or dropping the generator) cancels
        the RPC."""
        request = _generate_request(
            prompt,
            session_id=session_id,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            wc_budget=wc_budget,
            policy=policy,
            chat=chat,
            messages=messages,
            top_k=top_k,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty,
            logprobs=logprobs,
            idempotency_key=idempotency_key,
        )
        return self._stream(request, self._deadline(timeout, stream=True), bool(idempotency_key))

    async def _stream(
        self, request: pb.GenerateRequest, timeout: float | None, keyed: bool
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """A keyed Generate is sent again on UNAVAILABLE or DEADLINE_EXCEEDED before its first
        chunk arrived (each attempt with the whole `timeout`); later failures raise."""
        attempts = self._retry_attempts if keyed else 1
        attempt = 0
        while True:
            attempt += 1
            received = False
            call = self._stub.Generate(request, metadata=self._metadata, timeout=timeout)
            try:
                with _typed():
                    async for response in call:
                        received = True
                        yield response
                return
            except (Unavailable, DeadlineExceeded):
                if received or attempt >= attempts:
                    raise
            finally:
                call.cancel()  # no-op once the stream has finished
            await asyncio.sleep(_backoff_s(attempt))

    async def score(
        self,
        continuation: str | Sequence[int],
        *,
        session_id: str | None = None,
        context: str | Sequence[int] = "",
        wc_budget: int = 0,
        policy: str | int = "lens",
        query: str | Sequence[int] = "",
        timeout: float | None = None,
    ) -> pb.ScoreResponse:
        """Teacher-forced NLL of `continuation` after the session's lifetime and `context`, with
        the working context chosen for `query` (default: the newest tokens)."""
        request = _score_request(
            continuation, session_id=session_id, context=context, wc_budget=wc_budget,
            policy=policy, query=query,
        )  # fmt: skip
        with _typed():
            return await self._stub.Score(
                request, metadata=self._metadata, timeout=self._deadline(timeout)
            )

    async def working_context(
        self,
        session_id: str,
        *,
        wc_budget: int = 0,
        policy: str | int = "lens",
        query: str | Sequence[int] = "",
        timeout: float | None = None,
    ) -> pb.WorkingContext:
        """The working context the server would use now for `query` (default: the newest
        tokens)."""
        request = _working_context_request(
            session_id, wc_budget=wc_budget, policy=policy, query=query
        )
        with _typed():
            return await self._stub.GetWorkingContext(
                request, metadata=self._metadata, timeout=self._deadline(timeout)
            )

    async def lens_status(self, *, timeout: float | None = None) -> pb.LensStatus:
        with _typed():
            return await self._admin.GetLensStatus(
                pb.GetLensStatusRequest(),
                metadata=self._admin_metadata,
                timeout=self._deadline(timeout),
            )

    async def set_lens_version(
        self, version: str, *, timeout: float | None = None
    ) -> pb.SetLensVersionResponse:
        with _typed():
            return await self._admin.SetLensVersion(
                pb.SetLensVersionRequest(version=version),
                metadata=self._admin_metadata,
                timeout=self._deadline(timeout),
            )


class SyncLensClient:
    """Blocking client with the same methods as `LensClient`, on gRPC's sync channel."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        admin_token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        stream_timeout: float | None = DEFAULT_STREAM_TIMEOUT_S,
        retry_attempts: int = DEFAULT_RETRY_ATTEMPTS,
        load_balancing: str = "round_robin",
        keepalive_time_s: float = DEFAULT_KEEPALIVE_TIME_S,
        keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        config = service_config(load_balancing=load_balancing, retry_attempts=retry_attempts)
        options = _channel_options(
            max_message_bytes, config, keepalive_time_s, keepalive_timeout_s, options
        )
        credentials = _credentials(tls, root_certificates)
        self._channel = (
            grpc.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(target, options=options)
        )
        self._stub = pb_grpc.LensServeStub(self._channel)
        self._admin = pb_grpc.LensAdminStub(self._channel)
        self._metadata = _auth(token)
        self._admin_metadata = _auth(admin_token)
        self._timeout = timeout
        self._stream_timeout = stream_timeout
        self._retry_attempts = max(retry_attempts, 1)

    def _deadline(self, timeout: float | None, stream: bool = False) -> float | None:
        if timeout is not None:
            return timeout
        return self._stream_timeout if stream else self._timeout

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def create_session(self, *, timeout: float | None = None) -> pb.Session:
        with _typed():
            return self._stub.CreateSession(
                pb.CreateSessionRequest(), metadata=self._metadata, timeout=self._deadline(timeout)
            )

    def delete_session(self, session_id: str, *, timeout: float | None = None) -> None:
        with _typed():
            self._stub.DeleteSession(
                pb.DeleteSessionRequest(session_id=session_id),
                metadata=self._metadata,
                timeout=self._deadline(timeout),
            )

    def get_session(self, session_id: str, *, timeout: float | None = None) -> pb.Session:
        with _typed():
            return self._stub.GetSession(
                pb.GetSessionRequest(session_id=session_id),
                metadata=self._metadata,
                timeout=self._deadline(timeout),
            )

    def append(
        self,
        session_id: str,
        text: str | None = None,
        token_ids: Sequence[int] | None = None,
        *,
        chunk_chars: int = DEFAULT_CHUNK_CHARS,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> pb.AppendResponse:
        """Appends `text` or `token_ids` (exactly one) to a session, streamed in chunks. With
        `idempotency_key`, retrying after UNAVAILABLE or DEADLINE_EXCEEDED appends once."""
        requests = _append_requests(
            session_id, text, token_ids, chunk_chars, chunk_tokens, idempotency_key
        )
        deadline = self._deadline(timeout)
        attempts = self._retry_attempts if idempotency_key else 1
        for attempt in range(1, attempts + 1):
            try:
                with _typed():
                    return self._stub.Append(requests, metadata=self._metadata, timeout=deadline)
            except (Unavailable, DeadlineExceeded):
                if attempt >= attempts:
                    raise
            time.sleep(_backoff_s(attempt))
            requests = _append_requests(
                session_id, text, token_ids, chunk_chars, chunk_tokens, idempotency_key
            )
        raise AssertionError("unreachable")

    def generate(
        self,
        prompt: str | Sequence[int] = "",
        *,
        session_id: str | None = None,
        max_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 0.0,
        seed: int = 0,
        stop: Iterable[str] = (),
        wc_budget: int = 0,
        policy: str | int = "lens",
        chat: bool = False,
        messages: Sequence[Mapping[str, str]] = (),
        top_k: int = 0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 0.0,
        logprobs: int | None = None,
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> Generator[pb.GenerateResponse, None, None]:
        """Streams a completion (see `LensClient.generate`). Argument errors raise at the call;
        `close()` (or dropping the generator) cancels the call."""
        request = _generate_request(
            prompt,
            session_id=session_id,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            wc_budget=wc_budget,
            policy=policy,
            chat=chat,
            messages=messages,
            top_k=top_k,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty,
            logprobs=logprobs,
            idempotency_key=idempotency_key,
        )
        return self._stream(request, self._deadline(timeout, stream=True), bool(idempotency_key))

    def _stream(
        self, request: pb.GenerateRequest, timeout: float | None, keyed: bool
    ) -> Generator[pb.GenerateResponse, None, None]:
        """As `LensClient._stream`."""
        attempts = self._retry_attempts if keyed else 1
        attempt = 0
        while True:
            attempt += 1
            received = False
            call = self._stub.Generate(request, metadata=self._metadata, timeout=timeout)
            try:
                with _typed():
                    for response in call:
                        received = True
                        yield response
                return
            except (Unavailable, DeadlineExceeded):
                if received or attempt >= attempts:
                    raise
            finally:
                call.cancel()  # no-op once the stream has finished
            time.sleep(_backoff_s(attempt))

    def score(
        self,
        continuation: str | Sequence[int],
        *,
        session_id: str | None = None,
        context: str | Sequence[int] = "",
        wc_budget: int = 0,
        policy: str | int = "lens",
        query: str | Sequence[int] = "",
        timeout: float | None = None,
    ) -> pb.ScoreResponse:
        request = _score_request(
            continuation, session_id=session_id, context=context, wc_budget=wc_budget,
            policy=policy, query=query,
        )  # fmt: skip
        with _typed():
            return self._stub.Score(
                request, metadata=self._metadata, timeout=self._deadline(timeout)
            )

    def working_context(
        self,
        session_id: str,
        *,
        wc_budget: int = 0,
        policy: str | int = "lens",
        query: str | Sequence[int] = "",
        timeout: float | None = None,
    ) -> pb.WorkingContext:
        request = _working_context_request(
            session_id, wc_budget=wc_budget, policy=policy, query=query
        )
        with _typed():
            return self._stub.GetWorkingContext(
                request, metadata=self._metadata, timeout=self._deadline(timeout)
            )

    def lens_status(self, *, timeout: float | None = None) -> pb.LensStatus:
        with _typed():
            return self._admin.GetLensStatus(
                pb.GetLensStatusRequest(),
                metadata=self._admin_metadata,
                timeout=self._deadline(timeout),
            )

    def set_lens_version(
        self, version: str, *, timeout: float | None = None
    ) -> pb.SetLensVersionResponse:
        with _typed():
            return self._admin.SetLensVersion(
                pb.SetLensVersionRequest(version=version),
                metadata=self._admin_metadata,
                timeout=self._deadline(timeout),
            )
