"""The interceptor on a real grpc.aio server (production build_server, fake servicers): error ->
status mapping, auth, owner binding, metrics, streaming and cancellation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from lens_serve.service import auth
from lens_serve.v1 import lens_serve_pb2 as pb
from lens_serve.v1 import lens_serve_pb2_grpc as pb_grpc
from tests.fake_servicers import SECRET_DETAIL, FakeServer, make_settings, running_fake_server

TOKEN = "api-token-1"
ADMIN_TOKEN = "admin-token-1"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
GET_SESSION = "/lens_serve.v1.LensServe/GetSession"
GENERATE = "/lens_serve.v1.LensServe/Generate"


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    async with running_fake_server(
        make_settings(api_tokens=TOKEN, admin_token=ADMIN_TOKEN)
    ) as server:
        yield server


@pytest.fixture
async def stub(fake: FakeServer) -> AsyncIterator[pb_grpc.LensServeAsyncStub]:
    async with grpc.aio.insecure_channel(fake.target) as channel:
        yield pb_grpc.LensServeStub(channel)


def rpc_labels(method: str) -> dict[str, str]:
    """The metrics' labels of a method path (/lens_serve.v1.LensServe/Generate)."""
    service, name = method.removeprefix("/").split("/")
    return {"grpc_service": service, "grpc_method": name}


def errors_total(method: str, code: str) -> float:
    labels = {**rpc_labels(method), "grpc_code": code}
    return REGISTRY.get_sample_value("lens_rpc_errors_total", labels) or 0.0


async def errors_total_reaches(method: str, code: str, expected: float) -> float:
    """The counter once it reaches `expected` (or after 2 s). The server records a call's outcome
    just after it sends the status, so the client can see the status first."""
    for _ in range(200):
        if errors_total(method, code) >= expected:
            break
        await asyncio.sleep(0.01)
    return errors_total(method, code)


def latency_count(method: str) -> float:
    value = REGISTRY.get_sample_value("lens_rpc_latency_seconds_count", rpc_labels(method))
    return value or 0.0


async def get_session_error(
    stub: pb_grpc.LensServeAsyncStub, session_id: str
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=AUTH)
    return caught.value


@pytest.mark.parametrize(
    ("session_id", "code", "message"),
    [
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "session_id: must be 32 hex characters"),
        ("missing", grpc.StatusCode.NOT_FOUND, "session_id 'missing': session not found"),
        ("busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests in flight"),
        ("loading", grpc.StatusCode.UNAVAILABLE, "weights still loading"),
        ("redis", grpc.StatusCode.UNAVAILABLE, "redis"),
        ("abort", grpc.StatusCode.FAILED_PRECONDITION, "handler aborted"),
    ],
)
async def test_errors_map_to_status_when_handler_raises(
    stub: pb_grpc.LensServeAsyncStub, session_id: str, code: grpc.StatusCode, message: str
) -> None:
    before = errors_total(GET_SESSION, code.name)
    error = await get_session_error(stub, session_id)
    assert error.code() == code
    assert message in (error.details() or "")
    assert await errors_total_reaches(GET_SESSION, code.name, before + 1) == before + 1


async def test_redis_error_hides_connection_details(stub: pb_grpc.LensServeAsyncStub) -> None:
    error = await get_session_error(stub, "redis")
    assert "x.sock" not in (error.details() or "")


async def test_internal_error_hides_exception_text_and_logs_method(
    stub: pb_grpc.LensServeAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    before = errors_total(GET_SESSION, "INTERNAL")
    with caplog.at_level(logging.ERROR, logger="lens_serve.service.interceptors"):
        error = await get_session_error(stub, "boom")
    assert error.code() == grpc.StatusCode.INTERNAL
    details = error.details() or ""
    assert SECRET_DETAIL not in details
    assert "RuntimeError" not in details
    assert "error id" in details
    error_id = details.rsplit(" ", 1)[-1].rstrip(")")
    logged = [r for r in caplog.records if GET_SESSION in r.getMessage()]
    assert logged, "the unhandled error is logged with the method name"
    assert error_id in logged[0].getMessage()
    assert logged[0].exc_info is not None  # with its traceback
    assert await errors_total_reaches(GET_SESSION, "INTERNAL", before + 1) == before + 1


async def test_set_code_counted_when_handler_returns_normally(
    stub: pb_grpc.LensServeAsyncStub,
) -> None:
    before = errors_total(GET_SESSION, "ALREADY_EXISTS")
    error = await get_session_error(stub, "set-code")
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await errors_total_reaches(GET_SESSION, "ALREADY_EXISTS", before + 1) == before + 1


async def test_success_counted_timed_and_not_counted_as_error(
    stub: pb_grpc.LensServeAsyncStub,
) -> None:
    labels = {"grpc_service": "lens_serve.v1.LensServe", "grpc_method": "GetSession"}
    before_started = REGISTRY.get_sample_value("lens_rpc_started_total", labels) or 0.0
    before_count = latency_count(GET_SESSION)
    before_ok = errors_total(GET_SESSION, "OK")
    session = await stub.GetSession(pb.GetSessionRequest(session_id="fine"), metadata=AUTH)
    assert session.lifetime_tokens == 7
    assert REGISTRY.get_sample_value("lens_rpc_started_total", labels) == before_started + 1
    assert latency_count(GET_SESSION) == before_count + 1
    assert errors_total(GET_SESSION, "OK") == before_ok


async def test_owner_visible_inside_handler(stub: pb_grpc.LensServeAsyncStub) -> None:
    session = await stub.CreateSession(pb.CreateSessionRequest(), metadata=AUTH)
    assert session.session_id == auth.owner_for_token(TOKEN)
    chunks = [c async for c in stub.Generate(pb.GenerateRequest(prompt="owner"), metadata=AUTH)]
    assert chunks[0].text == auth.owner_for_token(TOKEN)


async def test_missing_token_unauthenticated_and_handler_not_run(
    fake: FakeServer, stub: pb_grpc.LensServeAsyncStub
) -> None:
    before = errors_total(GENERATE, "UNAUTHENTICATED")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateSession(pb.CreateSessionRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization" in (caught.value.details() or "")

    call = stub.Generate(
        pb.GenerateRequest(prompt="hello"), metadata=(("authorization", "Bearer x"),)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert fake.servicer.observed.generate_requests == []
    assert await errors_total_reaches(GENERATE, "UNAUTHENTICATED", before + 1) == before + 1


async def test_admin_service_needs_admin_token(fake: FakeServer) -> None:
    async with grpc.aio.insecure_channel(fake.target) as channel:
        admin = pb_grpc.LensAdminStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin.GetLensStatus(pb.GetLensStatusRequest(), metadata=AUTH)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        status = await admin.GetLensStatus(
            pb.GetLensStatusRequest(), metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),)
        )
        assert status.current_version == auth.ADMIN


async def test_health_open_and_watch_streams_through_interceptor(fake: FakeServer) -> None:
    await fake.health.set("lens_serve.v1.LensServe", health_pb2.HealthCheckResponse.SERVING)
    async with grpc.aio.insecure_channel(fake.target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # its published stubs declare no methods
        reply = await stub.Check(health_pb2.HealthCheckRequest(service="lens_serve.v1.LensServe"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Watch is a coroutine-style stream (context.write); the wrapper must keep that shape.
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="lens_serve.v1.LensServe"))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        await fake.health.set("lens_serve.v1.LensServe", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()


async def test_stream_error_midway_keeps_chunks_then_internal(
    stub: pb_grpc.LensServeAsyncStub,
) -> None:
    before = errors_total(GENERATE, "INTERNAL")
    received: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in stub.Generate(pb.GenerateRequest(prompt="midway"), metadata=AUTH):
            received.append(chunk.text)
    assert received == ["t0", "t1"]
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert SECRET_DETAIL not in (caught.value.details() or "")
    assert await errors_total_reaches(GENERATE, "INTERNAL", before + 1) == before + 1


async def test_stream_lens_error_midway_maps_status(stub: pb_grpc.LensServeAsyncStub) -> None:
    received: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in stub.Generate(
            pb.GenerateRequest(prompt="midway-invalid"), metadata=AUTH
        ):
            received.append(chunk.text)
    assert received == ["t0"]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("prompt:")


async def test_stream_completes_and_is_timed(stub: pb_grpc.LensServeAsyncStub) -> None:
    before = latency_count(GENERATE)
    chunks = [c async for c in stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=AUTH)]
    assert [c.text for c in chunks[:3]] == ["t0", "t1", "t2"]
    assert chunks[-1].finish_reason == "stop"
    assert latency_count(GENERATE) == before + 1


async def test_stream_cancelled_by_client_handler_sees_cancelled_error(
    fake: FakeServer, stub: pb_grpc.LensServeAsyncStub
) -> None:
    before = errors_total(GENERATE, "CANCELLED")
    call = stub.Generate(pb.GenerateRequest(prompt="slow"), metadata=AUTH)
    first = await call.read()
    assert isinstance(first, pb.GenerateResponse)
    assert first.text == "t0"
    call.cancel()
    await asyncio.wait_for(fake.servicer.observed.cancelled.wait(), timeout=5)
    await asyncio.wait_for(fake.servicer.observed.closed.wait(), timeout=5)
    for _ in range(50):  # the server task records its outcome just after the handler unwinds
        if errors_total(GENERATE, "CANCELLED") == before + 1:
            break
        await asyncio.sleep(0.02)
    assert await errors_total_reaches(GENERATE, "CANCELLED", before + 1) == before + 1


async def test_client_stream_error_maps_status(
    fake: FakeServer, stub: pb_grpc.LensServeAsyncStub
) -> None:
    requests = [pb.AppendRequest(session_id="s", text="ok"), pb.AppendRequest(text="bad")]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Append(iter(requests), metadata=AUTH)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("text:")


async def test_concurrent_calls_see_their_own_owner(fake: FakeServer) -> None:
    settings = make_settings(api_tokens="tok-a,tok-b")
    async with (
        running_fake_server(settings) as server,
        grpc.aio.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.LensServeStub(channel)
        calls = [
            stub.CreateSession(
                pb.CreateSessionRequest(), metadata=(("authorization", f"Bearer {t}"),)
            )
            for t in ["tok-a", "tok-b"] * 10
        ]
        sessions = await asyncio.gather(*calls)
    owners = [s.session_id for s in sessions]
    assert owners == [auth.owner_for_token(t) for t in ["tok-a", "tok-b"] * 10]
