"""The registry of published versions in a real redis-server (GistNet kind): round trip,
verification, rejection."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from lens_serve.core.gistnet import GistNet, GistNetConfig, build_gistnet
from lens_serve.store.registry import (
    GISTNET,
    WeightsRejected,
    current_gistnet,
    verify_gistnet,
)

HIDDEN = 32


def trained(seed: int = 0, rows: int = 1) -> GistNet:
    return build_gistnet(
        GistNetConfig("transformer", block_size=4, rows=rows, hidden_size=HIDDEN, width=16,
                      heads=2, layers=1, seed=seed)
    )  # fmt: skip


async def test_publish_fetch_round_trip_verifies_and_sets_current(redis_client: Redis) -> None:
    net = trained()
    version = await GISTNET.publish(redis_client, net, metrics={"kl": 0.5})
    assert version == net.version
    assert (await redis_client.get(GISTNET.current_key)) == version.encode()
    published = await GISTNET.fetch(redis_client, version)
    assert published.metrics == {"kl": 0.5}
    loaded = verify_gistnet(published, HIDDEN, block_size=4, rows=1)
    assert loaded.version == version
    picked = await current_gistnet(redis_client, HIDDEN, block_size=4, rows=1)
    assert picked is not None and picked.version == version


async def test_a_version_is_immutable(redis_client: Redis) -> None:
    net = trained()
    version = await GISTNET.publish(redis_client, net, metrics={"first": 1})
    await GISTNET.publish(redis_client, net, metrics={"second": 2})
    assert (await GISTNET.fetch(redis_client, version)).metrics == {"first": 1}


async def test_corrupt_weights_are_rejected(redis_client: Redis) -> None:
    version = await GISTNET.publish(redis_client, trained(seed=1))
    await redis_client.hset(GISTNET.key(version), "safetensors", b"garbage")
    with pytest.raises(WeightsRejected, match="sha256"):
        verify_gistnet(await GISTNET.fetch(redis_client, version), HIDDEN, 4, 1)
    assert await current_gistnet(redis_client, HIDDEN, 4, 1) is None


@pytest.mark.parametrize(
    ("hidden", "block", "rows", "field"),
    [(HIDDEN + 1, 4, 1, "hidden_size"), (HIDDEN, 8, 1, "block_size"), (HIDDEN, 4, 2, "rows")],
)
async def test_mismatched_config_is_rejected(
    redis_client: Redis, hidden: int, block: int, rows: int, field: str
) -> None:
    version = await GISTNET.publish(redis_client, trained(seed=2))
    with pytest.raises(WeightsRejected, match=field):
        verify_gistnet(await GISTNET.fetch(redis_client, version), hidden, block, rows)
    assert await current_gistnet(redis_client, hidden, block, rows) is None


async def test_no_published_gistnet_means_none(redis_client: Redis) -> None:
    await redis_client.delete(GISTNET.current_key)
    assert await current_gistnet(redis_client, HIDDEN, 4, 1) is None
