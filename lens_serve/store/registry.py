"""Published LensNet and GistNet versions in Redis: one versioned registry, two instances.

Layout (docs/design.md §4): hash `<prefix><version>` with `safetensors`, `sha256`, `config` (json),
`metrics` (json), `created_at`, `parent`; a string names the version servers must run
(`lens:current`, `lens:gistnet:current`); LensNet also announces each published or pinned version on
channel `lens:events`. A version is a content hash of config + weights, so publishing is idempotent
and a version never changes once written. A record of any other shape is rejected, never a crash."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.typing import EncodableT

from lens_serve.core import checkpoint
from lens_serve.core.gistnet import GistNet, gistnet_from_bytes
from lens_serve.core.lensnet import LensNet, lensnet_from_bytes
from lens_serve.errors import LensError, NotFound

logger = logging.getLogger(__name__)


class WeightsRejected(LensError):
    """Published weights failed verification (checksum, config or shapes); nothing was swapped."""

    status = "FAILED_PRECONDITION"


class IncompleteRecord(WeightsRejected):
    """A version record that lacks fields every publish writes (what the former two-step publish
    left when interrupted). Publishing the same net again repairs it, so unlike other rejections
    it is worth reading again."""


# Fields every publish writes. A record missing any of them is incomplete, and publish rewrites it.
_FIELDS = ("safetensors", "sha256", "config", "metrics", "created_at", "parent")

# One script, so the record and the current pointer change together or not at all, and a retry of
# an interrupted publish repairs the record. A complete record is never rewritten (§2.6: its name is
# the hash of its content, and its metrics and created_at are those of the first publish).
# KEYS: the version hash, the current key. ARGV: make_current ("1"/"0"), version, events channel
# ("" for none), then field/value pairs in _FIELDS order.
_PUBLISH = """
for i = 4, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], unpack(ARGV, 4))
    break
  end
end
if ARGV[1] == '1' then
  redis.call('SET', KEYS[2], ARGV[2])
  if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[2]) end
end
return 1
"""


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
        """Write `net` as an immutable version named by its content hash (a no-op if it exists,
        a repair if an interrupted publish left it incomplete), and optionally make it current,
        all in one atomic step. Returns the version."""
        weights = checkpoint.weights_bytes(net)
        version = net.version
        fields: dict[str, EncodableT] = {
            "safetensors": weights,
            "sha256": hashlib.sha256(weights).hexdigest(),
            "config": checkpoint.config_json(net.config),
            "metrics": json.dumps(metrics or {}, sort_keys=True),
            "created_at": repr(time.time()),
            "parent": parent,
        }
        pairs = [item for name in _FIELDS for item in (name, fields[name])]
        make = "1" if make_current else "0"
        await cast(
            Awaitable[int],
            redis.eval(
                _PUBLISH,
                2,
                self.key(version),
                self.current_key,
                make,
                version,
                self.events_channel,
                *pairs,
            ),
        )
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
        """The record of `version`. Raises NotFound, IncompleteRecord, or WeightsRejected for a
        record of any other wrong shape."""
        raw = cast(dict[bytes, bytes], await redis.hgetall(self.key(version)))
        if not raw:
            raise NotFound(f"version {version!r}: no published {self.what}")
        return _parse(version, raw)

    async def scan(self, redis: Redis) -> tuple[list[PublishedWeights], dict[str, str]]:
        """Every well-formed version (oldest first), and why each other record is not one."""
        found = []
        malformed: dict[str, str] = {}
        async for key in redis.scan_iter(match=f"{self.prefix}*", count=500):
            key = key.decode() if isinstance(key, bytes) else key
            if key == self.current_key:
                continue
            name = key[len(self.prefix) :]
            try:
                found.append(await self.fetch(redis, name))
            except NotFound:
                continue  # deleted since the scan saw it
            except WeightsRejected as e:
                malformed[name] = str(e)
        return sorted(found, key=lambda p: (p.created_at, p.version)), malformed

    async def list_versions(self, redis: Redis) -> list[PublishedWeights]:
        """Every well-formed version, oldest first (malformed records are logged and skipped)."""
        found, malformed = await self.scan(redis)
        for name, why in malformed.items():
            logger.warning("skipping %s record %s: %s", self.what, name, why)
        return found


def _parse(version: str, raw: dict[bytes, bytes]) -> PublishedWeights:
    """A record's fields, type-checked: whatever was written into Redis, a wrong shape is a
    WeightsRejected (IncompleteRecord if fields are missing), never another error."""
    missing = [name for name in _FIELDS if name.encode() not in raw]
    if missing:
        raise IncompleteRecord(f"version {version!r}: incomplete record (no {', '.join(missing)})")
    try:
        config = json.loads(raw[b"config"])
        metrics = json.loads(raw[b"metrics"])
        created_at = float(raw[b"created_at"])
        sha256 = raw[b"sha256"].decode()
        parent = raw[b"parent"].decode()
    except (ValueError, RecursionError) as e:  # bad JSON, number or UTF-8
        raise WeightsRejected(f"version {version!r}: malformed record ({e!r})") from e
    if not isinstance(config, dict):
        raise WeightsRejected(f"version {version!r}: config is not a JSON object")
    if not isinstance(metrics, dict):
        raise WeightsRejected(f"version {version!r}: metrics is not a JSON object")
    if not math.isfinite(created_at):
        raise WeightsRejected(f"version {version!r}: created_at is {created_at}")
    return PublishedWeights(
        version=version,
        config=config,
        weights=raw[b"safetensors"],
        sha256=sha256,
        metrics=metrics,
        created_at=created_at,
        parent=parent,
    )


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
    """The verified GistNet `lens:gistnet:current` names; if that one cannot be loaded here, the
    newest published version (by created_at) that can, logged. None if there is none, or Redis is
    unreachable: the caller keeps its configured GistNet. Read once at start: trees, and so every
    preference record, name exactly one GistNet version."""
    try:
        version = await GISTNET.current(redis)
        if not version:
            return None
        try:
            return verify_gistnet(
                await GISTNET.fetch(redis, version), hidden_size, block_size, rows
            )
        except LensError as e:  # not found, malformed or rejected
            logger.error("published GistNet %s cannot be loaded: %s", version, e)
        for published in reversed(await GISTNET.list_versions(redis)):
            if published.version == version:
                continue
            try:
                net = verify_gistnet(published, hidden_size, block_size, rows)
            except WeightsRejected as e:
                logger.info("GistNet %s cannot be loaded either: %s", published.version, e)
                continue
            logger.warning(
                "running GistNet %s instead of %s: the newest published one that loads",
                net.version,
                version,
            )
            return net
        logger.warning("no published GistNet loads: keeping the configured one")
    except RedisError as e:
        logger.warning("cannot read the published GistNet: %s", e)
    return None
