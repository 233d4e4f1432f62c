"""The registry of published versions in a real redis-server (GistNet kind): round trip,
verification, rejection of records of any shape, atomic publish, the start-up fallback."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from lens_serve.core import checkpoint
from lens_serve.core.gistnet import GistNet, GistNetConfig, build_gistnet
from lens_serve.store.registry import (
    GISTNET,
    IncompleteRecord,
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


def record(net: GistNet) -> dict[FieldT, EncodableT]:
    """The fields `Registry.publish` writes for `net`, to be altered and written raw."""
    weights = checkpoint.weights_bytes(net)
    return {
        "safetensors": weights,
        "sha256": hashlib.sha256(weights).hexdigest(),
        "config": checkpoint.config_json(net.config),
        "metrics": "{}",
        "created_at": repr(time.time()),
        "parent": "",
    }


async def test_publish_repairs_an_interrupted_publish(redis_client: Redis) -> None:
    net = trained(seed=3)
    # What the old two-step publish (HSETNX sha256, then HSET the rest) left when interrupted,
    # with lens:gistnet:current already pointing at it.
    await redis_client.hset(GISTNET.key(net.version), "sha256", record(net)["sha256"])
    await redis_client.set(GISTNET.current_key, net.version)
    with pytest.raises(IncompleteRecord):
        await GISTNET.fetch(redis_client, net.version)
    assert await GISTNET.publish(redis_client, net, metrics={"retry": 1}) == net.version
    published = await GISTNET.fetch(redis_client, net.version)
    assert published.metrics == {"retry": 1}
    assert verify_gistnet(published, HIDDEN, 4, 1).version == net.version
    picked = await current_gistnet(redis_client, HIDDEN, block_size=4, rows=1)
    assert picked is not None and picked.version == net.version


async def test_publish_writes_the_record_and_current_together(redis_client: Redis) -> None:
    first = await GISTNET.publish(redis_client, trained(seed=4))
    second = await GISTNET.publish(redis_client, trained(seed=5), make_current=False)
    assert await GISTNET.current(redis_client) == first
    assert await GISTNET.publish(redis_client, trained(seed=5)) == second  # exists: only current
    assert await GISTNET.current(redis_client) == second
    assert set(await redis_client.hkeys(GISTNET.key(second))) == {
        b"safetensors", b"sha256", b"config", b"metrics", b"created_at", b"parent"
    }  # fmt: skip


MALFORMED: dict[str, dict[FieldT, EncodableT]] = {
    "config is a list": {"config": "[]"},
    "config is a string": {"config": '"transformer"'},
    "config is null": {"config": "null"},
    "config is not json": {"config": "{"},
    "config is not utf-8": {"config": b"\xff"},
    "metrics is a list": {"metrics": "[1]"},
    "created_at is not a number": {"created_at": "soon"},
    "created_at is infinite": {"created_at": "inf"},
    "sha256 is wrong": {"sha256": "0" * 64},
    "safetensors is garbage": {"safetensors": b"garbage"},
    "hidden_size is a string": {"config": json.dumps({"kind": "transformer", "hidden_size": "32"})},
}


@pytest.mark.parametrize("change", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_record_is_rejected(
    redis_client: Redis, change: dict[FieldT, EncodableT]
) -> None:
    net = trained(seed=6)
    await redis_client.hset(GISTNET.key(net.version), mapping={**record(net), **change})
    with pytest.raises(WeightsRejected):
        verify_gistnet(await GISTNET.fetch(redis_client, net.version), HIDDEN, 4, 1)
    await redis_client.set(GISTNET.current_key, net.version)
    assert await current_gistnet(redis_client, HIDDEN, block_size=4, rows=1) is None


async def test_unloadable_current_gistnet_falls_back_to_the_newest_that_loads(
    redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await GISTNET.publish(redis_client, trained(seed=7))
    newer = await GISTNET.publish(redis_client, trained(seed=8))
    await GISTNET.publish(redis_client, trained(seed=9, rows=2))  # newest, not for these trees
    bad = trained(seed=10)
    await redis_client.hset(GISTNET.key(bad.version), mapping={**record(bad), "config": "[]"})
    await redis_client.set(GISTNET.current_key, bad.version)
    picked = await current_gistnet(redis_client, HIDDEN, block_size=4, rows=1)
    assert picked is not None and picked.version == newer
    assert f"running GistNet {newer} instead of {bad.version}" in caplog.text


async def test_unloadable_current_gistnet_and_nothing_else_keeps_the_configured_one(
    redis_client: Redis,
) -> None:
    bad = trained(seed=11)
    await redis_client.hset(GISTNET.key(bad.version), mapping={**record(bad), "config": "[]"})
    await redis_client.set(GISTNET.current_key, bad.version)
    assert await current_gistnet(redis_client, HIDDEN, block_size=4, rows=1) is None
