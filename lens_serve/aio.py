"""Stopping background tasks when a library may lose a cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

RECANCEL_INTERVAL_S = 0.5


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait until every one has finished, cancelling again while any still runs.

    One `cancel()` is not always enough: under Python 3.11, a cancellation that lands while
    redis-py's timed read (`PubSub.get_message(timeout=...)`) is timing out comes back as an
    ordinary timeout, and the loop around it carries on. Measured: the LensNet watcher ignored its
    cancel within 3 tries of 0-0.3 s lifetimes, which hung server shutdown for good."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_INTERVAL_S)
