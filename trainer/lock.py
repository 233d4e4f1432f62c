"""At most one active trainer: a leased Redis lock, and a fenced switch of `lens:current`.

`lens:trainer:lock` holds a random token, set with SET NX PX and renewed by a background task
while its holder runs. A holder that stalled past its lease (and was replaced) must not publish:
the switch of `lens:current` runs in one Lua script that first checks the token, so the check and
the write are atomic (a fencing check with no window between them)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid

from redis.asyncio import Redis
from redis.exceptions import RedisError

from lens_serve.store.registry import LENSNET

logger = logging.getLogger(__name__)

LOCK_KEY = "lens:trainer:lock"

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS: lock, current, weights hash of the version; ARGV: token, version, events channel.
_SET_CURRENT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
if redis.call('EXISTS', KEYS[3]) == 0 then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
"""


class LockLost(RuntimeError):
    """This trainer's lease ran out (another trainer may hold the lock now)."""


class TrainerLock:
    def __init__(self, redis: Redis, ttl_ms: int, *, key: str = LOCK_KEY) -> None:
        self._redis = redis
        self.key = key
        self.ttl_ms = ttl_ms
        # Names the holder for operators (GET lens:trainer:lock) and is unique per instance.
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.held = False
        self.lost = asyncio.Event()

    async def try_acquire(self) -> bool:
        self.held = bool(await self._redis.set(self.key, self.token, nx=True, px=self.ttl_ms))
        if self.held:
            self.lost.clear()
        return self.held

    async def acquire(self, stop: asyncio.Event, poll_s: float | None = None) -> bool:
        """Wait until the lock is ours (True) or `stop` is set (False)."""
        poll = poll_s if poll_s is not None else self.ttl_ms / 3000
        logged = False
        while not stop.is_set():
            if await self.try_acquire():
                logger.info("holding %s as %s", self.key, self.token)
                return True
            if not logged:
                holder = await self._redis.get(self.key)
                logger.info("waiting for %s (held by %r)", self.key, holder)
                logged = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll)
        return False

    async def renew(self) -> bool:
        ok = bool(await self._redis.eval(_RENEW, 1, self.key, self.token, str(self.ttl_ms)))
        if not ok and self.held:
            self.held = False
            self.lost.set()
            logger.error("lost %s: the lease expired and another trainer may hold it", self.key)
        return ok

    async def keep_alive(self) -> None:
        """Renew every third of the lease until cancelled or the lease is lost."""
        while self.held:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                if not await self.renew():
                    return
            except (RedisError, OSError) as e:
                # A transient outage: the lease may still be valid; the next renewal decides.
                logger.warning("renewing %s failed: %r", self.key, e)

    async def release(self) -> None:
        if self.held:
            self.held = False
            await self._redis.eval(_RELEASE, 1, self.key, self.token)
            logger.info("released %s", self.key)

    async def set_current(self, version: str) -> None:
        """Point `lens:current` at `version` and announce it, only while holding the lock."""
        result = await self._redis.eval(
            _SET_CURRENT,
            3,
            self.key,
            LENSNET.current_key,
            LENSNET.key(version),
            self.token,
            version,
            LENSNET.events_channel,
        )
        if result == -1:
            self.held = False
            self.lost.set()
            raise LockLost(f"{self.key} is no longer ours: not publishing {version}")
        if result == 0:
            raise RuntimeError(f"version {version} vanished before it became current")
