"""Python clients of a lens-serve server: `LensClient` (asyncio, grpc.aio) and `SyncLensClient`
(blocking, gRPC's own sync channel). Both have the same methods and take policies by name::

    async with LensClient("127.0.0.1:50051", token="...") as client:
        session = await client.create_session()
        await client.append(session.session_id, text=long_document)
        async for chunk in client.generate("Summarize.", session_id=session.session_id):
            print(chunk.text, end="")
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Self

import grpc
import grpc.aio

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


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    # Same limits as the server, in both directions, so a long Score text is not refused locally.
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


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
    `tls` or `root_certificates` (PEM bytes) is given. `timeout` (seconds) bounds each unary call;
    streams (Append, Generate) are not bounded by it."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        admin_token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout: float | None = None,
    ) -> None:
        options = _channel_options(max_message_bytes)
        credentials = _credentials(tls, root_certificates)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=options)
        )
        self._stub = pb_grpc.LensServeStub(self._channel)
        self._admin = pb_grpc.LensAdminStub(self._channel)
        self._metadata = _auth(token)
        self._admin_metadata = _auth(admin_token)
        self._timeout = timeout

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

    async def create_session(self) -> pb.Session:
        return await self._stub.CreateSession(
            pb.CreateSessionRequest(), metadata=self._metadata, timeout=self._timeout
        )

    async def delete_session(self, session_id: str) -> None:
        await self._stub.DeleteSession(
            pb.DeleteSessionRequest(session_id=session_id),
            metadata=self._metadata,
            timeout=self._timeout,
        )

    async def get_session(self, session_id: str) -> pb.Session:
        return await self._stub.GetSession(
            pb.GetSessionRequest(session_id=session_id),
            metadata=self._metadata,
            timeout=self._timeout,
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
    ) -> pb.AppendResponse:
        """Appends `text` or `token_ids` (exactly one) to a session, streamed in chunks. With
        `idempotency_key`, retrying after UNAVAILABLE or DEADLINE_EXCEEDED appends once."""
        # Checked here, so argument errors raise in the caller, not in gRPC's request consumer.
        requests = _append_requests(
            session_id, text, token_ids, chunk_chars, chunk_tokens, idempotency_key
        )
        return await self._stub.Append(requests, metadata=self._metadata)

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
        return self._stream(request)

    async def _stream(
        self, request: pb.GenerateRequest
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        call = self._stub.Generate(request, metadata=self._metadata)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()  # no-op once the stream has finished

    async def score(
        self,
        continuation: str | Sequence[int],
        *,
        session_id: str | None = None,
        context: str | Sequence[int] = "",
        wc_budget: int = 0,
        policy: str | int = "lens",
        query: str | Sequence[int] = "",
    ) -> pb.ScoreResponse:
        """Teacher-forced NLL of `continuation` after the session's lifetime and `context`, with
        the working context chosen for `query` (default: the newest tokens)."""
        request = _score_request(
            continuation, session_id=session_id, context=context, wc_budget=wc_budget,
            policy=policy, query=query,
        )  # fmt: skip
        return await self._stub.Score(request, metadata=self._metadata, timeout=self._timeout)

    async def working_context(
        self,
        session_id: str,
        *,
        wc_budget: int = 0,
        policy: str | int = "lens",
        query: str | Sequence[int] = "",
    ) -> pb.WorkingContext:
        """The working context the server would use now for `query` (default: the newest
        tokens)."""
        request = _working_context_request(
            session_id, wc_budget=wc_budget, policy=policy, query=query
        )
        return await self._stub.GetWorkingContext(
            request, metadata=self._metadata, timeout=self._timeout
        )

    async def lens_status(self) -> pb.LensStatus:
        return await self._admin.GetLensStatus(
            pb.GetLensStatusRequest(), metadata=self._admin_metadata, timeout=self._timeout
        )

    async def set_lens_version(self, version: str) -> pb.SetLensVersionResponse:
        return await self._admin.SetLensVersion(
            pb.SetLensVersionRequest(version=version),
            metadata=self._admin_metadata,
            timeout=self._timeout,
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
        timeout: float | None = None,
    ) -> None:
        options = _channel_options(max_message_bytes)
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

    def create_session(self) -> pb.Session:
        return self._stub.CreateSession(
            pb.CreateSessionRequest(), metadata=self._metadata, timeout=self._timeout
        )

    def delete_session(self, session_id: str) -> None:
        self._stub.DeleteSession(
            pb.DeleteSessionRequest(session_id=session_id),
            metadata=self._metadata,
            timeout=self._timeout,
        )

    def get_session(self, session_id: str) -> pb.Session:
        return self._stub.GetSession(
            pb.GetSessionRequest(session_id=session_id),
            metadata=self._metadata,
            timeout=self._timeout,
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
    ) -> pb.AppendResponse:
        """Appends `text` or `token_ids` (exactly one) to a session, streamed in chunks. With
        `idempotency_key`, retrying after UNAVAILABLE or DEADLINE_EXCEEDED appends once."""
        requests = _append_requests(
            session_id, text, token_ids, chunk_chars, chunk_tokens, idempotency_key
        )
        return self._stub.Append(requests, metadata=self._metadata)

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
        return self._stream(request)

    def _stream(self, request: pb.GenerateRequest) -> Generator[pb.GenerateResponse, None, None]:
        call = self._stub.Generate(request, metadata=self._metadata)
        try:
            yield from call
        finally:
            call.cancel()  # no-op once the stream has finished

    def score(
        self,
        continuation: str | Sequence[int],
        *,
        session_id: str | None = None,
        context: str | Sequence[int] = "",
        wc_budget: int = 0,
        policy: str | int = "lens",
        query: str | Sequence[int] = "",
    ) -> pb.ScoreResponse:
        request = _score_request(
            continuation, session_id=session_id, context=context, wc_budget=wc_budget,
            policy=policy, query=query,
        )  # fmt: skip
        return self._stub.Score(request, metadata=self._metadata, timeout=self._timeout)

    def working_context(
        self,
        session_id: str,
        *,
        wc_budget: int = 0,
        policy: str | int = "lens",
        query: str | Sequence[int] = "",
    ) -> pb.WorkingContext:
        request = _working_context_request(
            session_id, wc_budget=wc_budget, policy=policy, query=query
        )
        return self._stub.GetWorkingContext(request, metadata=self._metadata, timeout=self._timeout)

    def lens_status(self) -> pb.LensStatus:
        return self._admin.GetLensStatus(
            pb.GetLensStatusRequest(), metadata=self._admin_metadata, timeout=self._timeout
        )

    def set_lens_version(self, version: str) -> pb.SetLensVersionResponse:
        return self._admin.SetLensVersion(
            pb.SetLensVersionRequest(version=version),
            metadata=self._admin_metadata,
            timeout=self._timeout,
        )
