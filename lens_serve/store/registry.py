"""Published LensNet and GistNet versions in Redis: one versioned registry, two instances.

Layout (docs/design.md §4): hash `<prefix><version>` with `safetensors`, `sha256`, `config` (json),
`metrics` (json), `created_at`, `parent`; a string names the version servers must run
(`lens:current`, `lens:gistnet:current`); LensNet also announces each published or pinned version on
channel `lens:events`. A version is a content hash of config + weights, so publishing is idempotent
and a version never changes once written."""

from __future__ import annotations

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

from lens_serve.core import checkpoint
from lens_serve.core.gistnet import GistNet, gistnet_from_bytes
from lens_serve.core.lensnet import LensNet, lensnet_from_bytes
from lens_serve.errors import LensError, NotFound

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Registry:
    """The Redis keys of one kind of published net, and the operations on them."""

    what: str
    """Names the kind in errors and logs."""
    prefix: str
    """Key prefix of the version hashes."""
    current_key: str
    """String key naming the version servers must run."""
    events_channel: str = ""
    """Pub/sub channel told of every new current version ("": servers read it at start only)."""

    def key(self, version: str) -> str:
        return f"{self.prefix}{version}"

    async def publish(
        self,
        redis: Redis,
        net: LensNet | GistNet,
        *,
        metrics: dict[str, Any] | None = None,
        parent: str = "",
        make_current: bool = True,
    ) -> str:
        """Write `net` as an immutable version named by its content hash (a no-op if it exists),
        and optionally make it current. Returns the version."""
        weights = checkpoint.weights_bytes(net)
        version = net.version
        fields: dict[FieldT, EncodableT] = {
            "safetensors": weights,
            "sha256": hashlib.sha256(weights).hexdigest(),
            "config": checkpoint.config_json(net.config),
            "metrics": json.dumps(metrics or {}, sort_keys=True),
            "created_at": repr(time.time()),
            "parent": parent,
        }
        # HSETNX on one field decides who writes: a version, once written, is never overwritten.
        if await redis.hsetnx(self.key(version), "sha256", fields["sha256"]):
            await redis.hset(self.key(version), mapping=fields)
        if make_current:
            await self.set_current(redis, version)
        return version

    async def set_current(self, redis: Redis, version: str) -> None:
        if not await redis.exists(self.key(version)):
            raise NotFound(f"version {version!r}: no published {self.what}")
        await redis.set(self.current_key, version)
        if self.events_channel:
            await redis.publish(self.events_channel, version)

    async def current(self, redis: Redis) -> str | None:
        raw = await redis.get(self.current_key)
        return raw.decode() if isinstance(raw, bytes) else raw

    async def fetch(self, redis: Redis, version: str) -> PublishedWeights:
        raw = cast(dict[bytes, bytes], await redis.hgetall(self.key(version)))
        if not raw:
            raise NotFound(f"version {version!r}: no published {self.what}")
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

    async def list_versions(self, redis: Redis) -> list[PublishedWeights]:
        """Every published version, oldest first."""
        found = []
        async for key in redis.scan_iter(match=f"{self.prefix}*", count=500):
            key = key.decode() if isinstance(key, bytes) else key
            if key == self.current_key:
                continue
            name = key[len(self.prefix) :]
            try:
                found.append(await self.fetch(redis, name))
            except LensError:
                logger.warning("skipping malformed %s record %s", self.what, name)
        return sorted(found, key=lambda p: (p.created_at, p.version))


LENSNET = Registry("LensNet weights", "lens:weights:", "lens:current", "lens:events")
GISTNET = Registry("GistNet", "lens:gistnet:", "lens:gistnet:current")


def verify(
    published: PublishedWeights,
    build: Callable[[dict[str, Any], bytes], Any],
    **expected: object,
) -> Any:
    """Checksum, the `expected` config fields (hidden size, ...), a strict `build(config,
    weights)`, and the built module's `version` re-hashing to the published name."""
    name = published.version
    if hashlib.sha256(published.weights).hexdigest() != published.sha256:
        raise WeightsRejected(f"version {name!r}: sha256 mismatch")
    for field, want in expected.items():
        if published.config.get(field) != want:
            raise WeightsRejected(
                f"version {name!r}: {field} {published.config.get(field)} != this server's {want}"
            )
    try:
        net = build(published.config, published.weights)
    except Exception as e:  # any parse / shape failure means the weights are unusable
        raise WeightsRejected(f"version {name!r}: cannot load ({e})") from e
    if net.version != name:
        raise WeightsRejected(f"version {name!r}: content hashes to {net.version!r}")
    return net


def verify_lensnet(published: PublishedWeights, hidden_size: int) -> LensNet:
    """A verified LensNet from a published version (raises WeightsRejected)."""
    net: LensNet = verify(published, lensnet_from_bytes, hidden_size=hidden_size)
    return net


def verify_gistnet(
    published: PublishedWeights, hidden_size: int, block_size: int, rows: int
) -> GistNet:
    """A verified GistNet whose hidden size, block size and rows (budgets count rows) match."""
    net: GistNet = verify(
        published, gistnet_from_bytes, hidden_size=hidden_size, block_size=block_size, rows=rows
    )
    return net


async def current_gistnet(
    redis: Redis, hidden_size: int, block_size: int, rows: int
) -> GistNet | None:
    """The verified GistNet `lens:gistnet:current` names, or None (none published, unreachable,
    or rejected: logged, and the caller keeps its configured GistNet). Read once at start: trees,
    and so every preference record, name exactly one GistNet version."""
    try:
        version = await GISTNET.current(redis)
        if not version:
            return None
        published = await GISTNET.fetch(redis, version)
        return verify_gistnet(published, hidden_size, block_size, rows)
    except LensError as e:  # not found, malformed or rejected
        logger.error("published GistNet rejected, keeping the configured one: %s", e)
    except RedisError as e:
        logger.warning("cannot read the published GistNet: %s", e)
    return None
