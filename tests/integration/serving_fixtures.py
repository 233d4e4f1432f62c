"""A real LensServe stack for integration tests: the session's vLLM engine (tiny model), a real
redis-server, the production build_server with the real servicers on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health
from redis.asyncio import Redis

from lens_serve.config import Settings
from lens_serve.engine import VllmEngine
from lens_serve.server import build_server
from lens_serve.service import LensService
from lens_serve.servicer import LensAdminServicer, LensServeServicer
from lens_serve.v1 import lens_serve_pb2_grpc as pb_grpc

# The test engine's context is 2048 positions (tests/fixtures_engine.py).
BASE_SETTINGS: dict[str, Any] = dict(
    host="127.0.0.1", port=0, wc_budget=256, max_wc_budget=1024, tail=32, max_model_len=2048,
    max_tokens=8, max_completion_tokens=512, max_session_tokens=200_000, lens_poll_seconds=0.1,
)  # fmt: skip


@dataclass
class Stack:
    target: str
    service: LensService
    channel: grpc.aio.Channel
    stub: pb_grpc.LensServeAsyncStub
    admin: pb_grpc.LensAdminAsyncStub
    redis: Redis


@contextlib.asynccontextmanager
async def serving_stack(
    engine: VllmEngine, model_dir: Path, redis_url: str, **overrides: Any
) -> AsyncIterator[Stack]:
    settings = Settings(model=str(model_dir), redis_url=redis_url, **{**BASE_SETTINGS, **overrides})
    redis = Redis.from_url(redis_url)
    service = await LensService.create(settings, engine, redis)
    server, port = build_server(
        settings,
        serve_servicer=LensServeServicer(service),
        admin_servicer=LensAdminServicer(service),
        health=health.aio.HealthServicer(),
    )
    await server.start()
    target = f"127.0.0.1:{port}"
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
                await asyncio.wait_for(step, 10)
            except TimeoutError:
                raise AssertionError(f"teardown step {name} hung") from None
