"""LensClient's production behaviour against a real grpc.aio server (the FakeEngine, a real
redis-server): typed errors with the server's google.rpc details, deadlines on streams, gRPC's
retries of idempotent unary calls (and none of CreateSession), keyed Append retried once applied."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from redis.asyncio import Redis

from lens_serve.client import (
    DeadlineExceeded,
    InvalidArgument,
    LensClient,
    LensError,
    NotFound,
    ResourceExhausted,
    SyncLensClient,
    Unavailable,
    service_config,
)
from lens_serve.service.statuses import OVERLOADED_RETRY_AFTER_S
from lens_serve.v1 import lens_serve_pb2 as pb
from lens_serve.v1 import lens_serve_pb2_grpc as pb_grpc
from tests.fake_servicers import FakeServeServicer
from tests.service.test_servicer_faults import serving

KIB = 1 << 10


async def _wait_for(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


# ---- typed errors with the server's details ------------------------------------------------------


async def test_invalid_argument_names_the_field(redis_client: Redis) -> None:
    async with serving(redis_client) as s, LensClient(s.target) as client:
        with pytest.raises(InvalidArgument) as caught:
            await client.get_session("x" * 100)
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.field == "session_id"
    assert [field for field, _ in error.field_violations] == ["session_id"]
    assert (error.details() or "").startswith("session_id")
    assert isinstance(error, grpc.aio.AioRpcError)  # existing `except grpc.RpcError` still works


async def test_not_found_is_typed(redis_client: Redis) -> None:
    async with serving(redis_client) as s, LensClient(s.target) as client:
        with pytest.raises(NotFound) as caught:
            await client.get_session("no-such-session")
    assert caught.value.field is None


async def test_full_server_resource_exhausted_carries_retry_info(redis_client: Redis) -> None:
    async with serving(redis_client, max_concurrency=1) as s, LensClient(s.target) as client:
        s.engine.gate = asyncio.Event()  # the first stream holds its slot
        first = client.generate("held", max_tokens=2)
        held = asyncio.create_task(anext(first))
        await _wait_for(lambda: len(s.engine.params) == 1)
        with pytest.raises(ResourceExhausted) as caught:
            await anext(client.generate("refused", max_tokens=2))
        s.engine.gate.set()
        await held
        await first.aclose()
    assert caught.value.retry_after == OVERLOADED_RETRY_AFTER_S
    assert caught.value.field is None


async def test_append_over_limit_names_the_field_without_retry_info(redis_client: Redis) -> None:
    async with (
        serving(redis_client, max_append_bytes=4 * KIB) as s,
        LensClient(s.target) as client,
    ):
        session = await client.create_session()
        with pytest.raises(ResourceExhausted) as caught:
            await client.append(session.session_id, text="word " * KIB * 2)
    assert caught.value.field == "text"
    assert caught.value.retry_after is None  # the same request fails again: send less


# ---- deadlines -----------------------------------------------------------------------------------


async def test_stream_deadline_fires(redis_client: Redis) -> None:
    async with serving(redis_client) as s, LensClient(s.target, stream_timeout=30) as client:
        s.engine.gate = asyncio.Event()  # never set: the stream stalls before its first token
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(DeadlineExceeded):
            async for _ in client.generate("slow", max_tokens=2, timeout=0.3):
                pass
        assert loop.time() - start < 5
        # The client's own stream_timeout bounds a stream too.
        async with LensClient(s.target, stream_timeout=0.3) as short:
            with pytest.raises(DeadlineExceeded):
                async for _ in short.generate("slow", max_tokens=2):
                    pass


def test_sync_client_raises_typed_errors_with_deadlines() -> None:
    with (
        SyncLensClient("127.0.0.1:1", timeout=2.0, retry_attempts=1) as client,
        pytest.raises(Unavailable),
    ):
        client.get_session("s")


# ---- retries -------------------------------------------------------------------------------------


class _Flaky(FakeServeServicer):
    """UNAVAILABLE for the first `failures` calls of GetSession and CreateSession; counts them. No
    interceptor: the plain status, as a starting or draining server answers."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.calls: dict[str, int] = {}

    async def _maybe_fail(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.calls[method] <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "starting up")

    async def GetSession(self, request: Any, context: Any) -> pb.Session:
        await self._maybe_fail("GetSession", context)
        return pb.Session(session_id=request.session_id)

    async def CreateSession(self, request: Any, context: Any) -> pb.Session:
        await self._maybe_fail("CreateSession", context)
        return pb.Session(session_id="new")


async def _flaky_server(failures: int) -> tuple[grpc.aio.Server, _Flaky, str]:
    servicer = _Flaky(failures)
    server = grpc.aio.server()
    pb_grpc.add_LensServeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, f"127.0.0.1:{port}"


async def test_idempotent_unary_call_retried_on_unavailable_create_session_not() -> None:
    server, servicer, target = await _flaky_server(failures=2)
    try:
        async with LensClient(target) as client:
            assert (await client.get_session("s")).session_id == "s"
            assert servicer.calls["GetSession"] == 3  # two UNAVAILABLE, retried by gRPC
            with pytest.raises(Unavailable):
                await client.create_session()
            assert servicer.calls["CreateSession"] == 1  # never retried: not idempotent
        servicer.calls.clear()
        async with LensClient(target, retry_attempts=1) as no_retries:
            with pytest.raises(Unavailable):
                await no_retries.get_session("s")
    finally:
        await server.stop(grace=None)


def test_service_config_retries_only_idempotent_unary_methods() -> None:
    config = service_config()
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method_config,) = config["methodConfig"]
    methods = {name["method"] for name in method_config["name"]}
    assert methods == {"GetSession", "GetWorkingContext", "Score", "DeleteSession"}
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "methodConfig" not in service_config(retry_attempts=1)


class _LoseFirstAppendReply(grpc.aio.StreamUnaryClientInterceptor):
    """The first Append reaches the server and is applied, but its reply is "lost" (UNAVAILABLE)."""

    def __init__(self) -> None:
        self.calls = 0

    async def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        self.calls += 1
        call = await continuation(client_call_details, request_iterator)
        if self.calls == 1:
            await call
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                "reply lost",
            )
        return call


@pytest.fixture
def lose_first_reply() -> Iterator[_LoseFirstAppendReply]:
    yield _LoseFirstAppendReply()


async def test_keyed_append_retried_appends_once(
    redis_client: Redis, lose_first_reply: _LoseFirstAppendReply
) -> None:
    async with (
        serving(redis_client) as s,
        LensClient(s.target, interceptors=[lose_first_reply]) as client,
    ):
        session = await client.create_session()
        reply = await client.append(session.session_id, text="one two three", idempotency_key="k1")
        assert lose_first_reply.calls == 2  # retried after the lost reply
        after = await client.get_session(session.session_id)
        assert after.lifetime_tokens == reply.lifetime_tokens  # appended once
        # Without a key the client does not retry: the error reaches the caller.
        unkeyed = _LoseFirstAppendReply()
        async with LensClient(s.target, interceptors=[unkeyed]) as plain:
            with pytest.raises(Unavailable):
                await plain.append(session.session_id, text="four")
        assert unkeyed.calls == 1


async def test_every_error_is_a_lens_error(redis_client: Redis) -> None:
    async with serving(redis_client) as s, LensClient(s.target) as client:
        with pytest.raises(LensError):
            await client.working_context("no-such-session")
        stream: AsyncIterator[pb.GenerateResponse] = client.generate(
            "x", session_id="no-such-session"
        )
        with pytest.raises(NotFound):
            await anext(stream)


async def test_sync_client_reads_the_same_details(redis_client: Redis) -> None:
    def bad_call(target: str) -> InvalidArgument:
        with SyncLensClient(target) as client, pytest.raises(InvalidArgument) as caught:
            client.get_session("x" * 100)
        return caught.value

    async with serving(redis_client) as s:
        error = await asyncio.to_thread(bad_call, s.target)
    assert error.field == "session_id"
