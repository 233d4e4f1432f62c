"""The OpenAI-compatible endpoint's server: uvicorn in the gRPC server's event loop, on the same
host and domain service. It drains as gRPC does: once told to stop it accepts nothing new, lets
calls in flight finish for `drain_seconds`, then cancels them."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import sys
from collections.abc import Iterator

import uvicorn

from lens_serve.http.openai_api import build_app
from lens_serve.service.lens_service import LensService

_START_POLL_S = 0.01


class _Uvicorn(uvicorn.Server):
    """uvicorn without signal handlers: the lens-serve server owns SIGTERM and SIGINT (uvicorn
    would take them over and raise them again once it stops)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """A started endpoint; `stop` drains and ends it."""

    def __init__(self, server: _Uvicorn, task: asyncio.Task[None], host: str, port: int) -> None:
        self._server = server
        self._task = task
        self._drain_on: asyncio.Task[None] | None = None
        self.port = port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @classmethod
    async def start(cls, service: LensService) -> HttpServer:
        """Serves `service` on its settings' `host:http_port` (0 picks a free port, `port` says
        which) once this returns. Raises RuntimeError if the address cannot be bound."""
        settings = service.settings
        host = settings.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, settings.http_port), family=family)
        except OSError as exc:
            raise RuntimeError(f"cannot bind HTTP {host}:{settings.http_port}: {exc}") from exc
        config = uvicorn.Config(
            build_app(service),
            lifespan="off",  # nothing to start: the service is running already
            log_config=None,  # lens-serve's logging, as configured by the CLI
            access_log=False,  # like gRPC: the metrics count calls, the log has errors
            timeout_graceful_shutdown=math.ceil(settings.drain_seconds),  # uvicorn takes seconds
            ssl_certfile=settings.tls_cert,
            ssl_keyfile=settings.tls_key,
        )
        server = _Uvicorn(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                sock.close()
                await task  # its error
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(_START_POLL_S)
        return cls(server, task, host, int(sock.getsockname()[1]))

    def stop_when(self, event: asyncio.Event) -> None:
        """Start draining as soon as `event` is set (the server's SIGTERM), as gRPC does."""

        async def drain() -> None:
            await event.wait()
            self._server.should_exit = True

        self._drain_on = asyncio.create_task(drain())

    async def stop(self) -> None:
        """Stop accepting, let calls in flight finish (up to `drain_seconds`), and end."""
        if self._drain_on is not None:
            self._drain_on.cancel()
        self._server.should_exit = True
        await self._task


async def serve_http(service: LensService, stop: asyncio.Event) -> HttpServer:
    """The endpoint of `lens-serve serve --http-port N`: started, announced with one line
    `http listening on HOST:PORT`, draining once `stop` is set."""
    http = await HttpServer.start(service)
    http.stop_when(stop)
    sys.stdout.write(f"http listening on {http.address}\n")
    sys.stdout.flush()
    return http
