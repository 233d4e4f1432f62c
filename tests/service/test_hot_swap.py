"""The LensNet watcher against a real redis-server: it survives Redis restarts (and readiness says
when it is cut off), rejects malformed records of any shape without dying, and a server whose
`lens:current` cannot be loaded runs the newest version that can."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any, cast

import prometheus_client
import pytest
import pytest_asyncio
from grpc_health.v1 import health, health_pb2
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.typing import EncodableT, FieldT

from lens_serve.aio import cancel_and_wait
from lens_serve.core import checkpoint
from lens_serve.core.allocator import FocusConfig
from lens_serve.core.lensnet import LensNet, LensNetConfig
from lens_serve.service import server
from lens_serve.service.hot_swap import WeightStore
from lens_serve.service.lens_service import LensService
from lens_serve.service.servicer import LensAdminServicer
from lens_serve.store.registry import LENSNET
from lens_serve.v1 import lens_serve_pb2 as pb
from tests.fixtures_redis import RedisServer, RedisServerFactory

HIDDEN = 16
POLL_S = 0.05
# Short waits keep the tests fast; the watcher's logic does not depend on their size.
FAST = {"retry_seconds": 0.05, "retry_max_seconds": 0.2}


def lensnet(seed: int) -> LensNet:
    return LensNet(LensNetConfig(hidden_size=HIDDEN, width=16, layers=1, heads=2, seed=seed))


Record = dict[FieldT, EncodableT]


def record(net: LensNet) -> Record:
    """The fields `Registry.publish` writes for `net`, to be altered and written raw."""
    weights = checkpoint.weights_bytes(net)
    return {
        "safetensors": weights,
        "sha256": hashlib.sha256(weights).hexdigest(),
        "config": checkpoint.config_json(net.config),
        "metrics": "{}",
        "created_at": "1.0",
        "parent": "",
    }


def counter(name: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name) or 0.0


def swap_failures() -> float:
    return counter("lens_lensnet_swap_failures_total")


def watcher_failures() -> float:
    return counter("lens_lensnet_watcher_failures_total")


async def wait_for(predicate: Callable[[], object], what: str, within_s: float = 10.0) -> None:
    """Polls `predicate` (sync or async) until it is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def client(url: str) -> Redis:
    # Few, short retries: the watcher's own backoff is what is tested, not redis-py's.
    return Redis.from_url(
        url, socket_timeout=1.0, retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 2)
    )


@pytest_asyncio.fixture
async def restartable(
    redis_server_factory: RedisServerFactory,
) -> AsyncIterator[tuple[RedisServer, Redis]]:
    """A redis-server of its own (AOF on: its data survives a restart) and a client on it."""
    redis_server = redis_server_factory()
    redis = client(redis_server.url)
    try:
        yield redis_server, redis
    finally:
        await redis.aclose()


@pytest_asyncio.fixture
async def following(redis_client: Redis) -> AsyncIterator[WeightStore]:
    """A started WeightStore whose watcher follows the shared test Redis."""
    store = WeightStore(redis_client, HIDDEN, 0, FocusConfig(), **FAST)
    await store.start()
    task = asyncio.create_task(store.follow(POLL_S))
    try:
        yield store
    finally:
        await cancel_and_wait([task])
        assert not task.done() or task.cancelled(), "the watcher ended on its own"


# ---- Redis restarts --------------------------------------------------------------------------


async def test_watcher_swaps_to_a_version_published_after_redis_restarts(
    restartable: tuple[RedisServer, Redis],
) -> None:
    redis_server, redis = restartable
    first = await LENSNET.publish(redis, lensnet(1))
    store = WeightStore(redis, HIDDEN, 0, FocusConfig(), **FAST)
    await store.start()
    assert store.version == first
    task = asyncio.create_task(store.follow(POLL_S))
    try:
        await asyncio.sleep(3 * POLL_S)
        failures = watcher_failures()
        await asyncio.to_thread(redis_server.stop)
        await wait_for(lambda: watcher_failures() >= failures + 2, "the watcher to retry")
        assert store.watcher_down_seconds() > 0
        await asyncio.to_thread(redis_server.start)
        second = await LENSNET.publish(redis, lensnet(2))
        await wait_for(lambda: store.version == second, "the swap after the restart")
        assert store.watcher_down_seconds() == 0
        assert not task.done()
    finally:
        await cancel_and_wait([task])


async def test_watcher_rereads_current_after_a_reconnect(
    redis_server_factory: RedisServerFactory,
) -> None:
    """A failover: the Redis that takes over the address already names a version the watcher was
    never told about. Polling is too slow to matter here: only the re-read after the reconnect
    can find it."""
    primary, replica = redis_server_factory(), redis_server_factory()
    async with client(replica.url) as other:
        version = await LENSNET.publish(other, lensnet(2), make_current=False)
        await other.set(LENSNET.current_key, version)  # no announcement
    redis = client(primary.url)
    store = WeightStore(redis, HIDDEN, 0, FocusConfig(), **FAST)
    await store.start()
    task = asyncio.create_task(store.follow(poll_seconds=600))
    try:
        await asyncio.sleep(0.1)  # subscribed
        failures = watcher_failures()
        await asyncio.to_thread(primary.stop)
        await wait_for(lambda: watcher_failures() > failures, "the watcher to notice")
        primary.socket.symlink_to(replica.socket)  # the address now reaches the replica
        await wait_for(lambda: store.version == version, "the watcher to catch up")
    finally:
        await cancel_and_wait([task])
        await redis.aclose()


async def test_readiness_follows_the_watcher_and_liveness_does_not(
    restartable: tuple[RedisServer, Redis],
) -> None:
    redis_server, redis = restartable
    store = WeightStore(redis, HIDDEN, 0, FocusConfig(), **FAST)
    await store.start()
    health_servicer = health.aio.HealthServicer()
    for name in (server.OVERALL_HEALTH, server.LENS_SERVE_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def status(name: str) -> int:
        request = health_pb2.HealthCheckRequest(service=name)
        response = await health_servicer.Check(request, cast(Any, None))
        return response.status

    class HealthyEngine:
        async def is_healthy(self) -> bool:
            return True

    unready_after_s = 0.4
    tasks = [
        asyncio.create_task(store.follow(POLL_S)),
        asyncio.create_task(
            server._watch_health(
                cast(Any, HealthyEngine()),
                store.watcher_down_seconds,
                health_servicer,
                unready_after_s,
            )
        ),
    ]
    serving = health_pb2.HealthCheckResponse.SERVING
    ready = server.LENS_SERVE_SERVICE

    async def readiness_is(want: int) -> bool:
        return await status(ready) == want

    try:
        await asyncio.sleep(2 * unready_after_s)
        assert await readiness_is(serving)
        await asyncio.to_thread(redis_server.stop)
        await wait_for(lambda: readiness_is(health_pb2.HealthCheckResponse.NOT_SERVING), "unready")
        assert store.watcher_down_seconds() > unready_after_s
        assert await status(server.OVERALL_HEALTH) == serving  # no reason to restart the replica
        await asyncio.to_thread(redis_server.start)
        await wait_for(lambda: readiness_is(serving), "readiness to come back")
        assert await status(server.OVERALL_HEALTH) == serving
    finally:
        await cancel_and_wait(tasks)


# ---- malformed records ----------------------------------------------------------------------


def _broken(field: str, value: EncodableT | None) -> Callable[[Record], None]:
    def edit(fields: Record) -> None:
        if value is None:
            del fields[field]
        else:
            fields[field] = value

    return edit


def _keep_only(fields: Record, kept: str) -> None:
    for name in list(fields):
        if name != kept:
            del fields[name]


MALFORMED = {
    "config is a list": _broken("config", "[]"),
    "config is null": _broken("config", "null"),
    "config is not json": _broken("config", "{"),
    "config lacks fields": _broken("config", "{}"),
    "config has a wrong type": _broken("config", json.dumps({"hidden_size": "16"})),
    "config has another hidden size": _broken("config", json.dumps({"hidden_size": 8})),
    "metrics is a list": _broken("metrics", "[]"),
    "created_at is not a number": _broken("created_at", "yesterday"),
    "created_at is nan": _broken("created_at", "nan"),
    "sha256 is not utf-8": _broken("sha256", b"\xff\xfe"),
    "sha256 is wrong": _broken("sha256", "0" * 64),
    "safetensors is garbage": _broken("safetensors", b"garbage"),
    "config is missing": _broken("config", None),
    "only sha256": lambda fields: _keep_only(fields, "sha256"),
}


@pytest.mark.parametrize("edit", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_current_is_rejected_and_later_versions_load(
    redis_client: Redis, following: WeightStore, edit: Callable[[Record], None]
) -> None:
    bad = lensnet(3)
    fields = record(bad)
    edit(fields)
    rejected = swap_failures()
    await redis_client.hset(LENSNET.key(bad.version), mapping=fields)
    await redis_client.set(LENSNET.current_key, bad.version)
    await wait_for(lambda: swap_failures() > rejected, "the rejection to be counted")
    assert bad.version in following.not_current_reason
    good = await LENSNET.publish(redis_client, lensnet(4))
    await wait_for(lambda: following.version == good, "the next valid version")
    assert following.not_current_reason == ""
    assert swap_failures() == rejected + 1  # one rejection, counted once


async def test_a_torn_current_loads_once_a_retried_publish_repairs_it(
    redis_client: Redis, following: WeightStore
) -> None:
    net = lensnet(5)
    # What the old two-step publish left when it was interrupted.
    await redis_client.hset(LENSNET.key(net.version), "sha256", record(net)["sha256"])
    await redis_client.set(LENSNET.current_key, net.version)
    await wait_for(lambda: "incomplete" in following.not_current_reason, "the torn record")
    await LENSNET.publish(redis_client, net)  # the publisher's retry
    await wait_for(lambda: following.version == net.version, "the repaired version")


# ---- start-up fallback and GetLensStatus ----------------------------------------------------


async def test_start_runs_the_newest_loadable_version_when_current_is_unloadable(
    redis_client: Redis,
) -> None:
    older = await LENSNET.publish(redis_client, lensnet(6))
    newer = await LENSNET.publish(redis_client, lensnet(7))
    mismatched = LensNet(LensNetConfig(hidden_size=2 * HIDDEN, width=16, layers=1, heads=2))
    newest = await LENSNET.publish(redis_client, mismatched)  # newest, but not for this server
    assert (await LENSNET.fetch(redis_client, older)).created_at < (
        await LENSNET.fetch(redis_client, newer)
    ).created_at
    bad = lensnet(8)
    await redis_client.hset(LENSNET.key(bad.version), mapping={**record(bad), "config": "[]"})
    await redis_client.set(LENSNET.current_key, bad.version)
    store = WeightStore(redis_client, HIDDEN, 0, FocusConfig(), **FAST)
    await store.start()
    assert store.version == newer
    assert f"lens:current {bad.version} cannot be loaded" in store.not_current_reason
    assert f"running {newer}" in store.not_current_reason

    admin = LensAdminServicer(cast(LensService, SimpleNamespace(weights=store)))
    status = await admin.GetLensStatus(pb.GetLensStatusRequest(), cast(Any, None))
    assert status.current_version == bad.version
    assert status.loaded_version == newer
    assert status.not_current_reason == store.not_current_reason
    assert list(status.versions) == [older, newer, newest, bad.version]
    reasons = {v.version: v.unloadable_reason for v in status.version_info}
    assert reasons[older] == reasons[newer] == ""
    assert "hidden_size" in reasons[newest]
    assert "config is not a JSON object" in reasons[bad.version]


async def test_start_runs_the_seeded_lensnet_when_nothing_loads(redis_client: Redis) -> None:
    bad = lensnet(9)
    await redis_client.hset(LENSNET.key(bad.version), mapping={**record(bad), "metrics": "[]"})
    await redis_client.set(LENSNET.current_key, bad.version)
    store = WeightStore(redis_client, HIDDEN, 0, FocusConfig(), **FAST)
    await store.start()
    assert store.version == LensNet(LensNetConfig(hidden_size=HIDDEN, seed=0)).version
    assert "running the seeded initial LensNet" in store.not_current_reason
