"""Published GistNet versions in Redis (DESIGN §4): hash `lens:gistnet:<version>` laid out like
LensNet weights, and string `lens:gistnet:current` naming the version servers build trees with.

A server reads `current` once at start: its trees, and so every preference record, name exactly
one GistNet version (no live switching: a tree built with one version never meets another's)."""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from lens_serve import checkpoint
from lens_serve.errors import LensError
from lens_serve.gistnet import GistNet, gistnet_from_bytes
from lens_serve.weights import PublishedWeights, WeightsRejected, read_record, verify_record
from lens_serve.weights import write_record as write_weights_record

logger = logging.getLogger(__name__)

GISTNET_KEY_PREFIX = "lens:gistnet:"
GISTNET_CURRENT_KEY = "lens:gistnet:current"


def gistnet_key(version: str) -> str:
    return f"{GISTNET_KEY_PREFIX}{version}"


async def publish_gistnet(
    redis: Redis,
    net: GistNet,
    *,
    metrics: dict[str, object] | None = None,
    parent: str = "",
    make_current: bool = True,
) -> str:
    """Write `net` as an immutable version (a no-op if it exists) and optionally make it current."""
    weights = checkpoint.weights_bytes(net)
    version = net.version
    await write_weights_record(redis, gistnet_key(version), net.config, weights, metrics, parent)
    if make_current:
        await redis.set(GISTNET_CURRENT_KEY, version)
    return version


async def fetch_gistnet(redis: Redis, version: str) -> PublishedWeights:
    return await read_record(redis, gistnet_key(version), version, "GistNet")


def verify_gistnet(
    published: PublishedWeights, hidden_size: int, block_size: int, rows: int
) -> GistNet:
    """Checksum, hidden size, block size and rows (budgets count rows), strict load, and the
    version re-hashing to its name."""
    for field, want in (("block_size", block_size), ("rows", rows)):
        if published.config.get(field) != want:
            raise WeightsRejected(
                f"GistNet {published.version!r}: {field} {published.config.get(field)} "
                f"!= the configured {want}"
            )
    net: GistNet = verify_record(published, hidden_size, gistnet_from_bytes)
    return net


async def current_gistnet(
    redis: Redis, hidden_size: int, block_size: int, rows: int
) -> GistNet | None:
    """The verified GistNet `lens:gistnet:current` names, or None (none published, unreachable,
    or rejected: logged, and the caller keeps its configured GistNet)."""
    try:
        raw = await redis.get(GISTNET_CURRENT_KEY)
        if not raw:
            return None
        version = raw.decode() if isinstance(raw, bytes) else str(raw)
        published = await fetch_gistnet(redis, version)
        return verify_gistnet(published, hidden_size, block_size, rows)
    except LensError as e:  # not found, malformed or rejected
        logger.error("published GistNet rejected, keeping the configured one: %s", e)
    except RedisError as e:
        logger.warning("cannot read the published GistNet: %s", e)
    return None
