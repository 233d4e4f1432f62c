"""The LensNet this server runs, and its hot swap: a verified copy of one published version behind
one reference, following `lens:current` (pub/sub for promptness, polling for missed messages). The
watcher outlives Redis outages: it reconnects with capped exponential backoff and re-reads
`lens:current`, and says how long it has been cut off (readiness follows that)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NoReturn

from redis.asyncio import Redis
from redis.exceptions import RedisError

from lens_serve import metrics
from lens_serve.core.allocator import FocusConfig
from lens_serve.core.lensnet import LensNet, LensNetConfig
from lens_serve.core.policies import ContextChooser
from lens_serve.errors import InvalidRequest, NotFound
from lens_serve.store.registry import (
    LENSNET,
    IncompleteRecord,
    PublishedWeights,
    WeightsRejected,
    verify_lensnet,
)

logger = logging.getLogger(__name__)


class WeightStore:
    """The LensNet this server runs: one `ContextChooser` reference, swapped whole.

    Requests take `chooser` once at their start, so a swap never changes a request midway."""

    def __init__(
        self,
        redis: Redis,
        hidden_size: int,
        seed: int,
        focus: FocusConfig,
        *,
        retry_seconds: float = 0.5,
        retry_max_seconds: float = 5.0,
    ) -> None:
        self._redis = redis
        self._hidden_size = hidden_size
        self._focus = focus
        self._retry_seconds = retry_seconds
        self._retry_max_seconds = retry_max_seconds
        self._initial = LensNet(LensNetConfig(hidden_size=hidden_size, seed=seed))
        self.chooser = ContextChooser(self._initial, focus)
        self._lock = asyncio.Lock()
        # version -> why it cannot be loaded. A complete record never changes, so these are never
        # read again; a missing or incomplete one may yet be (re)published, so those are retried.
        self._rejected: dict[str, str] = {}
        self._incomplete: dict[str, str] = {}
        self._checked: dict[str, str] = {}  # GetLensStatus: version -> "" or why it cannot load
        self._down_since: float | None = None  # monotonic time the watcher lost Redis
        self._not_current: tuple[str, str] | None = None  # lens:current, why it is not loaded

    @property
    def version(self) -> str:
        return self.chooser.lens_version

    @property
    def not_current_reason(self) -> str:
        """Why this server does not run the version `lens:current` names, and what it runs
        instead; "" when it does (or while a swap is under way)."""
        if self._not_current is None:
            return ""
        version, why = self._not_current
        running = "the seeded initial LensNet" if self.version == self._initial.version else ""
        return f"lens:current {version} cannot be loaded ({why}); running {running or self.version}"

    def watcher_down_seconds(self) -> float:
        """How long the watcher has been cut off from Redis; 0 while it follows `lens:current`."""
        return 0.0 if self._down_since is None else time.monotonic() - self._down_since

    async def start(self) -> None:
        """Run the version `lens:current` names; if it cannot be loaded, the newest published
        version that can (logged, and reported by GetLensStatus); else the seeded initial LensNet.
        Redis being unreachable is logged: the watcher catches up once it is back."""
        try:
            current = await LENSNET.current(self._redis)
            if current and not await self._try_load(current):
                await self._fall_back(current)
        except RedisError as e:
            logger.warning("cannot read lens:current at start: %s", e)
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
        makes missed messages harmless. A version that fails verification is logged and counted,
        and the loaded one keeps serving. Any failure of the watcher itself (Redis down or
        restarted) is logged and counted, and it subscribes again after a backoff."""
        delay = self._retry_seconds
        while True:
            # Whatever ends a subscription (Redis down or restarted, or a bug) must not end the
            # watcher: a dead task would leave this server on one LensNet for good.
            try:
                await self._follow(poll_seconds)
            except Exception as e:
                metrics.LENS_WATCHER_FAILURES_TOTAL.inc()
                if self._down_since is None:  # it was following: a new outage, a short wait first
                    self._down_since = time.monotonic()
                    delay = self._retry_seconds
                else:
                    delay = min(2 * delay, self._retry_max_seconds)
                logger.warning(
                    "LensNet watcher failed, subscribing again in %.2f s: %r",
                    delay,
                    e,
                    exc_info=not isinstance(e, (RedisError, OSError)),  # a traceback for bugs
                )
            await asyncio.sleep(delay)

    async def _follow(self, poll_seconds: float) -> NoReturn:
        """Subscribe and follow until something fails."""
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(LENSNET.events_channel)
            while True:
                # Read lens:current before waiting: announcements made while the watcher was cut
                # off are lost, and after a reconnect this is what catches up.
                await self._sync_current()
                if self._down_since is not None:
                    logger.info("LensNet watcher back after %.1f s", self.watcher_down_seconds())
                    self._down_since = None
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll_seconds)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped

    async def _sync_current(self) -> None:
        """Load what `lens:current` names unless it is loaded or known to be unloadable."""
        version = await LENSNET.current(self._redis)
        if not version or version == self.version:
            self._not_current = None
            return
        if version in self._rejected:
            self._not_current = (version, self._rejected[version])
            return
        if await self._try_load(version):
            metrics.LENS_VERSION_INFO.clear()
            metrics.LENS_VERSION_INFO.labels(self.version).set(1)
            logger.info("LensNet hot-swapped to %s", self.version)

    async def _try_load(self, version: str) -> bool:
        """Load `version`; if it cannot be, log and count that once, say so in
        `not_current_reason`, and return False. Redis errors propagate."""
        try:
            await self.load(version)
        except (IncompleteRecord, NotFound) as e:
            reported = version in self._incomplete
            self._incomplete[version] = str(e)
            self._unloadable(version, str(e), reported)
            return False
        except WeightsRejected as e:
            self._rejected[version] = str(e)
            self._unloadable(version, str(e), False)
            return False
        self._incomplete.pop(version, None)
        self._not_current = None
        return True

    def _unloadable(self, version: str, why: str, reported: bool) -> None:
        self._not_current = (version, why)
        if not reported:
            metrics.LENS_SWAP_FAILURES_TOTAL.inc()
            logger.error("LensNet %s rejected, still serving %s: %s", version, self.version, why)

    async def _fall_back(self, current: str) -> None:
        """Load the newest published version that loads, other than `current`; else keep the
        seeded initial LensNet. Either way `not_current_reason` says so."""
        for published in reversed(await LENSNET.list_versions(self._redis)):
            if published.version == current or published.version in self._rejected:
                continue
            try:
                await self.load(published.version)
            except (WeightsRejected, NotFound) as e:
                logger.info("LensNet %s cannot be loaded either: %s", published.version, e)
                continue
            break
        if self.version == self._initial.version:
            logger.warning("%s: no published version loads", self.not_current_reason)
        else:
            logger.warning("%s, the newest published version that loads", self.not_current_reason)

    async def published(self) -> tuple[str | None, list[PublishedWeights], dict[str, str]]:
        """What `lens:current` names, every well-formed published version (oldest first), and
        why each version this server cannot load cannot be (malformed records included)."""
        current = await LENSNET.current(self._redis)
        versions, unloadable = await LENSNET.scan(self._redis)
        for published in versions:
            if published.version not in self._checked:
                self._checked[published.version] = await asyncio.to_thread(self._check, published)
            if self._checked[published.version]:
                unloadable[published.version] = self._checked[published.version]
        return current, versions, unloadable

    def _check(self, published: PublishedWeights) -> str:
        try:
            verify_lensnet(published, self._hidden_size)
        except WeightsRejected as e:
            return str(e)
        return ""

    async def pin(self, version: str) -> str:
        """Make `version` current for every server (rollback = pin an older one)."""
        if not version:
            raise InvalidRequest("version", "must name a published version")
        previous = await LENSNET.current(self._redis) or self.version
        await self.load(version)  # verify before telling the fleet
        await LENSNET.set_current(self._redis, version)
        return previous
