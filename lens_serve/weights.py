"""Published LensNet weights in Redis, and the server's verified, swappable copy of one version.

Layout (DESIGN §4): hash `lens:weights:<version>` with `safetensors`, `sha256`, `config` (json),
`metrics` (json), `created_at`, `parent`; string `lens:current` names the version servers must run;
channel `lens:events` carries a message per published or pinned version. A version is a content
hash of config + weights, so publishing is idempotent and a version never changes once written."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from lens_serve import checkpoint, metrics
from lens_serve.allocator import FocusConfig
from lens_serve.errors import InvalidRequest, LensError, NotFound
from lens_serve.lensnet import LensNet, LensNetConfig, lensnet_from_bytes
from lens_serve.policies import ContextChooser

logger = logging.getLogger(__name__)

WEIGHTS_KEY_PREFIX = "lens:weights:"
CURRENT_KEY = "lens:current"
EVENTS_CHANNEL = "lens:events"


def weights_key(version: str) -> str:
    return f"{WEIGHTS_KEY_PREFIX}{version}"


class WeightsRejected(LensError):
    """Published weights failed verification (checksum, config or shapes); nothing was swapped."""

    status = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class PublishedWeights:
    version: str
    config: dict[str, Any]
    weights: bytes
    sha256: str
    metrics: dict[str, Any]
    created_at: float
    parent: str


async def publish(
    redis: Redis,
    net: LensNet,
    *,
    metrics: dict[str, Any] | None = None,
    parent: str = "",
    make_current: bool = True,
) -> str:
    """Write `net` as an immutable version (a no-op if it exists) and optionally make it current."""
    weights = checkpoint.weights_bytes(net)
    version = checkpoint.content_version("lens", net.config, weights)
    await write_record(redis, weights_key(version), net.config, weights, metrics, parent)
    if make_current:
        await set_current(redis, version)
    return version


async def write_record(
    redis: Redis,
    key: str,
    config: Any,
    weights: bytes,
    metrics: dict[str, Any] | None,
    parent: str,
) -> None:
    """Write one immutable weights hash (shared by LensNet and GistNet versions)."""
    fields: dict[FieldT, EncodableT] = {
        "safetensors": weights,
        "sha256": hashlib.sha256(weights).hexdigest(),
        "config": checkpoint.config_json(config),
        "metrics": json.dumps(metrics or {}, sort_keys=True),
        "created_at": repr(time.time()),
        "parent": parent,
    }
    # HSETNX on one field decides who writes: a version, once written, is never overwritten.
    if await redis.hsetnx(key, "sha256", fields["sha256"]):
        await redis.hset(key, mapping=fields)


async def set_current(redis: Redis, version: str) -> None:
    if not await redis.exists(weights_key(version)):
        raise NotFound(f"version {version!r}: no published LensNet weights")
    await redis.set(CURRENT_KEY, version)
    await redis.publish(EVENTS_CHANNEL, version)


async def current_version(redis: Redis) -> str | None:
    raw = await redis.get(CURRENT_KEY)
    return raw.decode() if isinstance(raw, bytes) else raw


async def fetch(redis: Redis, version: str) -> PublishedWeights:
    return await read_record(redis, weights_key(version), version, "LensNet weights")


async def read_record(redis: Redis, key: str, version: str, what: str) -> PublishedWeights:
    """Read one weights hash written by `write_record`; `what` names it in errors."""
    raw = cast(dict[bytes, bytes], await redis.hgetall(key))
    if not raw:
        raise NotFound(f"version {version!r}: no published {what}")
    try:
        return PublishedWeights(
            version=version,
            config=json.loads(raw[b"config"]),
            weights=raw[b"safetensors"],
            sha256=raw[b"sha256"].decode(),
            metrics=json.loads(raw.get(b"metrics", b"{}")),
            created_at=float(raw.get(b"created_at", b"0")),
            parent=raw.get(b"parent", b"").decode(),
        )
    except (KeyError, ValueError) as e:
        raise WeightsRejected(f"version {version!r}: malformed record ({e!r})") from e


def verify_and_load(published: PublishedWeights, hidden_size: int) -> LensNet:
    """Checksum, config and shapes, then a strict load; the version must re-hash to its name."""
    net: LensNet = verify_record(published, hidden_size, lensnet_from_bytes)
    return net


def verify_record(
    published: PublishedWeights,
    hidden_size: int,
    build: Callable[[dict[str, Any], bytes], Any],
) -> Any:
    """Checksum, hidden size, a strict `build(config, weights)`, and the built module's `version`
    re-hashing to the published name (shared by LensNet and GistNet versions)."""
    name = published.version
    if hashlib.sha256(published.weights).hexdigest() != published.sha256:
        raise WeightsRejected(f"version {name!r}: sha256 mismatch")
    if published.config.get("hidden_size") != hidden_size:
        raise WeightsRejected(
            f"version {name!r}: hidden_size {published.config.get('hidden_size')} != "
            f"this model's {hidden_size}"
        )
    try:
        net = build(published.config, published.weights)
    except Exception as e:  # any parse / shape failure means the weights are unusable
        raise WeightsRejected(f"version {name!r}: cannot load ({e})") from e
    if net.version != name:
        raise WeightsRejected(f"version {name!r}: content hashes to {net.version!r}")
    return net


async def list_versions(redis: Redis) -> list[PublishedWeights]:
    """Every published version, oldest first."""
    found = []
    async for key in redis.scan_iter(match=f"{WEIGHTS_KEY_PREFIX}*", count=500):
        name = (key.decode() if isinstance(key, bytes) else key)[len(WEIGHTS_KEY_PREFIX) :]
        try:
            found.append(await fetch(redis, name))
        except LensError:
            logger.warning("skipping malformed weights record %s", name)
    return sorted(found, key=lambda p: (p.created_at, p.version))


class WeightStore:
    """The LensNet this server runs: one `ContextChooser` reference, swapped whole.

    Requests take `chooser` once at their start, so a swap never changes a request midway."""

    def __init__(self, redis: Redis, hidden_size: int, seed: int, focus: FocusConfig) -> None:
        self._redis = redis
        self._hidden_size = hidden_size
        self._focus = focus
        self._initial = LensNet(LensNetConfig(hidden_size=hidden_size, seed=seed))
        self.chooser = ContextChooser(self._initial, focus)
        self._lock = asyncio.Lock()
        self._rejected: set[str] = set()  # versions that failed verification: never retried

    @property
    def version(self) -> str:
        return self.chooser.lens_version

    async def start(self) -> None:
        """Run the version `lens:current` names, else the seeded initial LensNet."""
        await self._sync_current()
        metrics.LENS_VERSION_INFO.labels(self.version).set(1)
        logger.info("LensNet %s loaded", self.version)

    async def load(self, version: str) -> None:
        """Fetch, verify and load `version` off the event loop, then swap one reference."""
        async with self._lock:
            if version == self.version:
                return
            if version == self._initial.version:
                self.chooser = ContextChooser(self._initial, self._focus)
                return
            published = await fetch(self._redis, version)
            net = await asyncio.to_thread(verify_and_load, published, self._hidden_size)
            self.chooser = ContextChooser(net, self._focus)

    async def follow(self, poll_seconds: float = 1.0) -> None:
        """Run forever: load whatever `lens:current` names. Pub/sub makes a swap prompt; polling
        makes missed messages (a reconnect, a Redis restart) harmless. A version that fails
        verification is logged and counted, and the loaded one keeps serving."""
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(EVENTS_CHANNEL)
            while True:
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll_seconds)
                await self._sync_current()
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped

    async def _sync_current(self) -> None:
        try:
            version = await current_version(self._redis)
            if version and version != self.version and version not in self._rejected:
                await self.load(version)
                metrics.LENS_VERSION_INFO.clear()
                metrics.LENS_VERSION_INFO.labels(self.version).set(1)
                logger.info("LensNet hot-swapped to %s", self.version)
        except (WeightsRejected, NotFound) as e:
            self._rejected.add(version or "")
            metrics.LENS_SWAP_FAILURES_TOTAL.inc()
            logger.error("LensNet %s rejected, still serving %s: %s", version, self.version, e)
        except RedisError as e:  # Redis down: keep serving, try again on the next poll
            logger.warning("LensNet watcher cannot reach Redis: %s", e)

    async def pin(self, version: str) -> str:
        """Make `version` current for every server (rollback = pin an older one)."""
        if not version:
            raise InvalidRequest("version", "must name a published version")
        previous = await current_version(self._redis) or self.version
        await self.load(version)  # verify before telling the fleet
        await set_current(self._redis, version)
        return previous
