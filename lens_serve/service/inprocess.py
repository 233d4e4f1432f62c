"""The whole server in this process around an engine the caller already started: the production
`build_server` with the real servicers, a real Redis, and a channel to it. Benchmarks and the
integration tests use it so that one vLLM engine serves many server lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health
from redis.asyncio import Redis

from lens_serve.engine.protocol import Engine
from lens_serve.service.composition import build_service, build_servicers
from lens_serve.service.config import Settings
from lens_serve.service.lens_service import LensService
from lens_serve.service.server import build_server, redis_client
from lens_serve.v1 import lens_serve_pb2_grpc as pb_grpc

TEARDOWN_TIMEOUT_S = 10


@dataclass
class Stack:
    target: str
    service: LensService
    channel: grpc.aio.Channel
    stub: pb_grpc.LensServeAsyncStub
    admin: pb_grpc.LensAdminAsyncStub
    redis: Redis


@contextlib.asynccontextmanager
async def serving_stack(settings: Settings, engine: Engine) -> AsyncIterator[Stack]:
    """Serve `engine` on `settings.host:settings.port` (0 = a free port) with the Redis at
    `settings.redis_url`. The engine outlives the stack; everything else is closed on exit, and a
    teardown step that hangs raises instead of blocking the caller forever."""
    if not settings.redis_url:
        raise ValueError("settings.redis_url: an in-process stack needs a running Redis")
    redis = redis_client(settings, settings.redis_url)
    service = await build_service(settings, engine, redis)
    serve_servicer, admin_servicer = build_servicers(service)
    server, port = build_server(
        settings,
        serve_servicer=serve_servicer,
        admin_servicer=admin_servicer,
        health=health.aio.HealthServicer(),
    )
    await server.start()
    target = f"{settings.host}:{port}"
    channel = grpc.aio.insecure_channel(target)
    try:
        stub, admin = pb_grpc.LensServeStub(channel), pb_grpc.LensAdminStub(channel)
        yield Stack(target, service, channel, stub, admin, redis)
    finally:
        for name, step in (
            ("channel", channel.close()),
            ("server", server.stop(None)),
            ("service", service.aclose()),
            ("redis", redis.aclose()),
        ):
            try:
                await asyncio.wait_for(step, TEARDOWN_TIMEOUT_S)
            except TimeoutError:
                raise RuntimeError(f"teardown step {name} hung") from None
