"""The gRPC server: `build_server` wires servicers, health, reflection and the interceptor onto a
bound grpc.aio server; `serve` is the production entry (`lens-serve serve`): Redis, metrics, the
vLLM engine, the domain service, health, signals and a graceful drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import inspect
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
import grpc.aio
import prometheus_client
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health as health_v1
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.asyncio import Redis

from lens_serve import tracing
from lens_serve.aio import cancel_and_wait
from lens_serve.errors import NotReady
from lens_serve.service.config import Settings
from lens_serve.service.interceptors import LensInterceptor, relay
from lens_serve.store.embedded import EmbeddedRedis
from lens_serve.v1 import lens_serve_pb2, lens_serve_pb2_grpc

if TYPE_CHECKING:
    from lens_serve.engine.protocol import Engine
    from lens_serve.service.servicer import LensServeServicer

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

LENS_SERVE_SERVICE: str = lens_serve_pb2.DESCRIPTOR.services_by_name["LensServe"].full_name
LENS_ADMIN_SERVICE: str = lens_serve_pb2.DESCRIPTOR.services_by_name["LensAdmin"].full_name
OVERALL_HEALTH = ""
"""The health name of the whole server (K8s liveness); LENS_SERVE_SERVICE is readiness."""
# How often the engine's health is polled; it only reads a flag in vLLM, so this is cheap, and 5 s
# is well inside a readiness probe's period.
_ENGINE_HEALTH_INTERVAL_S = 5.0
# Readiness looks at the LensNet watcher this many times per `lens_unready_seconds` (a clock read),
# so it turns NOT_SERVING at most a quarter of that limit late.
_LENS_CHECKS_PER_LIMIT = 4

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _version() -> str:
    try:
        return importlib.metadata.version("lens-serve")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "(not installed)"


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def redis_client(settings: Settings, url: str) -> Redis:
    """The server's Redis client, with its own timeouts: a stalled or restarted Redis fails a
    command within `redis_socket_timeout_s` instead of hanging it (bytes responses: the session
    store needs them)."""
    # redis_url.connect reads every URL form (redis, rediss, unix, redis+sentinel) in one place.
    from lens_serve.store.redis_url import connect

    return connect(
        url,
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_connect_timeout_s,
        health_check_interval=settings.redis_health_check_s,
    )


def _connection_options(settings: Settings) -> list[tuple[str, int]]:
    """Keepalive both ways, and a maximum connection age: behind the headless Service, clients
    re-resolve the pods only when a connection closes (docs/deployment.md)."""
    grace_s = settings.max_connection_age_grace_s
    if grace_s is None:
        grace_s = settings.drain_seconds
    return [
        ("grpc.keepalive_time_ms", _ms(settings.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(settings.keepalive_timeout_s)),
        # Accept the clients' keepalive pings (lens_serve.client: every 30 s, also when idle).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(settings.min_client_ping_interval_s)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_connection_age_ms", _ms(settings.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", _ms(grace_s)),
    ]


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def build_server(
    settings: Settings,
    *,
    serve_servicer: lens_serve_pb2_grpc.LensServeServicer,
    admin_servicer: lens_serve_pb2_grpc.LensAdminServicer,
    health: health_v1.aio.HealthServicer,
) -> tuple[grpc.aio.Server, int]:
    """A bound, not yet started server and its real port (`settings.port` 0 picks a free one).

    TLS when settings.tls_cert/tls_key are set, else plaintext. Raises RuntimeError if the address
    cannot be bound.
    """
    server = grpc.aio.server(
        interceptors=[LensInterceptor(settings)],
        options=[
            # Long documents arrive as Append chunks and Score requests can carry long texts;
            # one limit for both directions keeps client and server symmetric.
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            # Refuse to share the port with another process: a second server on the same port
            # would silently receive half of the calls.
            ("grpc.so_reuseport", 0),
            *_connection_options(settings),
        ],
        # No maximum_concurrent_rpcs: the service bounds Generate/Score itself
        # (settings.max_concurrency) and answers RESOURCE_EXHAUSTED, which clients understand.
    )
    lens_serve_pb2_grpc.add_LensServeServicer_to_server(serve_servicer, server)
    lens_serve_pb2_grpc.add_LensAdminServicer_to_server(admin_servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            LENS_SERVE_SERVICE,
            LENS_ADMIN_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = _address(settings.host, settings.port)
    try:
        if settings.tls_cert is not None and settings.tls_key is not None:
            credentials = grpc.ssl_server_credentials(
                [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
            )
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot bind {address}: {exc}") from exc
    if port == 0:  # older gRPC reported a failed bind this way
        raise RuntimeError(f"cannot bind {address}")
    return server, port


# --------------------------------------------------------------------------------------------------
# Servicers that exist before the model is loaded


class _Deferred:
    """Forwards every RPC of one service to a servicer bound once loading is done. Before that
    every call fails with UNAVAILABLE, so the server (and its health service, which probes use)
    can listen while the engine loads."""

    def __init__(self) -> None:
        self._target: Any = None

    def bind(self, target: object) -> None:
        self._target = target

    def _require(self) -> Any:
        if self._target is None:
            raise NotReady("server is starting: the model is still loading")
        return self._target


def _forward_unary(name: str) -> Callable[..., Any]:
    async def forward(self: _Deferred, request: Any, context: Any) -> Any:
        result = getattr(self._require(), name)(request, context)
        return await result if inspect.isawaitable(result) else result

    forward.__name__ = name
    return forward


def _forward_stream(name: str) -> Callable[..., Any]:
    async def forward(self: _Deferred, request: Any, context: Any) -> AsyncIterator[Any]:
        target = self._require()
        async with aclosing(relay(getattr(target, name)(request, context))) as responses:
            async for response in responses:
                yield response

    forward.__name__ = name
    return forward


def _deferred_servicer(base: type[object], service: ServiceDescriptor) -> _Deferred:
    """A `_Deferred` that is also a `base` (a generated servicer class) with every RPC forwarded.
    Built from the descriptor, so an RPC added to the proto is forwarded without changes here."""
    namespace = {
        m.name: _forward_stream(m.name) if m.server_streaming else _forward_unary(m.name)
        for m in service.methods
    }
    cls = type(f"Deferred{service.name}", (_Deferred, base), namespace)
    return cast(_Deferred, cls())


# --------------------------------------------------------------------------------------------------
# Production entry


async def serve(settings: Settings) -> None:
    """Runs the server until SIGTERM/SIGINT, then drains: health NOT_SERVING, in-flight calls get
    `settings.drain_seconds` to finish, then the service, engine and Redis are closed."""
    logger.info(
        "starting lens-serve %s; non-default settings: %s",
        _version(),
        settings.non_defaults() or "none",
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            logger.info("received %s: already shutting down", sig.name)
        else:
            logger.info("received %s: shutting down", sig.name)
        stop.set()

    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with contextlib.AsyncExitStack() as resources:
            await _run(settings, stop, resources)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    logger.info("lens-serve stopped")


async def _run(
    settings: Settings, stop: asyncio.Event, resources: contextlib.AsyncExitStack
) -> None:
    # Closed last to first: embedded Redis outlives everything that uses it.
    redis_url = settings.redis_url
    if not redis_url:
        embedded = await resources.enter_async_context(EmbeddedRedis())
        redis_url = embedded.url
    if settings.metrics_port > 0:
        # Same interface as gRPC: a pod binds 0.0.0.0 for both, a laptop keeps both local.
        http_server, http_thread = prometheus_client.start_http_server(
            settings.metrics_port, addr=settings.host
        )
        resources.callback(http_thread.join)
        resources.callback(http_server.shutdown)
        logger.info("metrics on http://%s/metrics", _address(settings.host, settings.metrics_port))
    tracing.configure(settings.otel_endpoint)
    resources.callback(tracing.shutdown)  # late: the spans of the drained calls are sent too
    redis = redis_client(settings, redis_url)
    resources.push_async_callback(_step, "redis client closed", redis.aclose)

    health_servicer = health_v1.aio.HealthServicer()
    for name in (OVERALL_HEALTH, LENS_SERVE_SERVICE):
        await health_servicer.set(name, _NOT_SERVING)
    serve_proxy = _deferred_servicer(
        lens_serve_pb2_grpc.LensServeServicer,
        lens_serve_pb2.DESCRIPTOR.services_by_name["LensServe"],
    )
    admin_proxy = _deferred_servicer(
        lens_serve_pb2_grpc.LensAdminServicer,
        lens_serve_pb2.DESCRIPTOR.services_by_name["LensAdmin"],
    )
    server, port = build_server(
        settings,
        serve_servicer=cast(lens_serve_pb2_grpc.LensServeServicer, serve_proxy),
        admin_servicer=cast(lens_serve_pb2_grpc.LensAdminServicer, admin_proxy),
        health=health_servicer,
    )
    await server.start()
    logger.info(
        "gRPC server bound to %s (NOT_SERVING while loading)", _address(settings.host, port)
    )

    # The engine and the service are closed after the server has drained (their own stack).
    async with contextlib.AsyncExitStack() as domain:
        try:
            loaded = await _until_stopped(_load(settings, redis, domain), stop)
            if loaded is None:
                logger.info("shutdown requested while loading")
                return
            serve_servicer, admin_servicer, engine, lens_down_seconds = loaded
            serve_proxy.bind(serve_servicer)
            admin_proxy.bind(admin_servicer)
            for name in (OVERALL_HEALTH, LENS_SERVE_SERVICE):
                await health_servicer.set(name, _SERVING)
            if settings.http_port:  # the OpenAI-compatible endpoint, on the same service
                from lens_serve.http.server import serve_http

                service = cast("LensServeServicer", serve_servicer).service
                http = await serve_http(service, stop)  # drains once `stop` is set, as gRPC
                domain.push_async_callback(_step, "HTTP server stopped", http.stop)
            sys.stdout.write(f"listening on {_address(settings.host, port)}\n")
            sys.stdout.flush()
            watcher = asyncio.create_task(
                _watch_health(
                    engine, lens_down_seconds, health_servicer, settings.lens_unready_seconds
                )
            )
            try:
                await stop.wait()
            finally:
                await cancel_and_wait([watcher])
        finally:
            await health_servicer.enter_graceful_shutdown()
            logger.info("health set to NOT_SERVING")
            await server.stop(grace=settings.drain_seconds)
            logger.info("gRPC server stopped (drain up to %.1f s)", settings.drain_seconds)


async def _until_stopped(work: Coroutine[Any, Any, _T], stop: asyncio.Event) -> _T | None:
    """`work`'s result, or None (work cancelled) if `stop` is set first."""
    task = asyncio.create_task(work)
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # let a cancelled load unwind (its closers are on the stack)
    return task.result() if not task.cancelled() else None


async def _load(
    settings: Settings, redis: Redis, domain: contextlib.AsyncExitStack
) -> tuple[
    lens_serve_pb2_grpc.LensServeServicer,
    lens_serve_pb2_grpc.LensAdminServicer,
    Engine,
    Callable[[], float],
]:
    """Engine, domain service, its servicers, and how long the LensNet watcher has been cut off
    from Redis; each closer goes on `domain` once its object exists."""
    # Heavy imports (torch, vLLM) only here: the CLI has configured logging before they load, and
    # importing this module (tests, `--help`) stays cheap.
    from lens_serve.assets.model_dirs import resolve_model
    from lens_serve.engine.vllm import VllmEngine
    from lens_serve.service.composition import build_service, build_servicers

    model_dir = await asyncio.to_thread(resolve_model, settings.model, settings.models_dir)
    config = settings.engine_config(model_dir)
    logger.info("loading engine: %s", config)
    engine = await VllmEngine.create(config)
    domain.push_async_callback(_step, "engine shut down", engine.shutdown)
    service = await build_service(settings, engine, redis)
    domain.push_async_callback(_step, "service closed", service.aclose)
    logger.info("service ready")
    return (*build_servicers(service), engine, service.weights.watcher_down_seconds)


async def _step(message: str, close: Callable[[], Any]) -> None:
    """Runs one shutdown step and logs it; a failing step is logged and the next ones still run."""
    try:
        result = close()
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("shutdown step failed: %s", message)
    else:
        logger.info("%s", message)


async def _watch_health(
    engine: Engine,
    lens_down_seconds: Callable[[], float],
    health_servicer: health_v1.aio.HealthServicer,
    unready_after_s: float,
) -> None:
    """Turns health NOT_SERVING for good if the engine dies, so probes restart or drain this
    replica. Readiness alone is NOT_SERVING while the LensNet watcher has been cut off from Redis
    longer than `unready_after_s` (this replica may be running a LensNet the fleet has left), and
    SERVING again once it is back: a Redis outage is no reason to restart the replica."""
    loop = asyncio.get_running_loop()
    interval = min(_ENGINE_HEALTH_INTERVAL_S, unready_after_s / _LENS_CHECKS_PER_LIMIT)
    engine_due = loop.time() + _ENGINE_HEALTH_INTERVAL_S
    ready = True
    while True:
        await asyncio.sleep(interval)
        if loop.time() >= engine_due:
            engine_due = loop.time() + _ENGINE_HEALTH_INTERVAL_S
            if not await engine.is_healthy():
                logger.error("engine is not healthy: health set to NOT_SERVING")
                for name in (OVERALL_HEALTH, LENS_SERVE_SERVICE):
                    await health_servicer.set(name, _NOT_SERVING)
                return
        down = lens_down_seconds()
        if ready and down > unready_after_s:
            ready = False
            logger.error("LensNet watcher cut off from Redis for %.1f s: not ready", down)
            await health_servicer.set(LENS_SERVE_SERVICE, _NOT_SERVING)
        elif not ready and down == 0:
            ready = True
            logger.info("LensNet watcher is back: ready")
            await health_servicer.set(LENS_SERVE_SERVICE, _SERVING)
