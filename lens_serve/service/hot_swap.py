"""The LensNet this server runs, and its hot swap: a verified copy of one published version behind
one reference, following `lens:current` (pub/sub for promptness, polling for missed messages)."""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from lens_serve import metrics
from lens_serve.core.allocator import FocusConfig
from lens_serve.core.lensnet import LensNet, LensNetConfig
from lens_serve.core.policies import ContextChooser
from lens_serve.errors import InvalidRequest, NotFound
from lens_serve.store.registry import LENSNET, PublishedWeights, WeightsRejected, verify_lensnet

logger = logging.getLogger(__name__)


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
            published = await LENSNET.fetch(self._redis, version)
            net = await asyncio.to_thread(verify_lensnet, published, self._hidden_size)
            self.chooser = ContextChooser(net, self._focus)

    async def follow(self, poll_seconds: float = 1.0) -> None:
        """Run forever: load whatever `lens:current` names. Pub/sub makes a swap prompt; polling
        makes missed messages (a reconnect, a Redis restart) harmless. A version that fails
        verification is logged and counted, and the loaded one keeps serving."""
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(LENSNET.events_channel)
            while True:
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll_seconds)
                await self._sync_current()
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped

    async def _sync_current(self) -> None:
        try:
            version = await LENSNET.current(self._redis)
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

    async def published(self) -> tuple[str | None, list[PublishedWeights]]:
        """What `lens:current` names, and every published version (oldest first)."""
        return await LENSNET.current(self._redis), await LENSNET.list_versions(self._redis)

    async def pin(self, version: str) -> str:
        """Make `version` current for every server (rollback = pin an older one)."""
        if not version:
            raise InvalidRequest("version", "must name a published version")
        previous = await LENSNET.current(self._redis) or self.version
        await self.load(version)  # verify before telling the fleet
        await LENSNET.set_current(self._redis, version)
        return previous
