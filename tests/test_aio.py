"""Background tasks stop even when a cancellation is lost on the way."""

from __future__ import annotations

import asyncio
import random

from redis.asyncio import Redis

from lens_serve.aio import cancel_and_wait
from lens_serve.core.allocator import FocusConfig
from lens_serve.service.hot_swap import WeightStore
from tests.core_helpers import HIDDEN


async def test_a_task_that_swallows_its_first_cancel_is_cancelled_again() -> None:
    cancels_seen = 0

    async def swallows_once() -> None:
        nonlocal cancels_seen
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels_seen += 1
                if cancels_seen > 1:
                    raise

    task = asyncio.create_task(swallows_once())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait([task]), timeout=10)
    assert task.cancelled() and cancels_seen == 2


async def test_the_lens_watcher_always_stops(redis_client: Redis) -> None:
    """The watcher polls Redis pub/sub with a timeout; a cancel landing as that timeout fires
    used to be lost, and server shutdown hung. Many short lifetimes make that race likely."""
    rng = random.Random(0)
    for _ in range(40):
        weights = WeightStore(redis_client, HIDDEN, seed=0, focus=FocusConfig())
        watcher = asyncio.create_task(weights.follow(poll_seconds=0.01))
        await asyncio.sleep(rng.uniform(0.0, 0.05))
        await asyncio.wait_for(cancel_and_wait([watcher]), timeout=10)
        assert watcher.done()
