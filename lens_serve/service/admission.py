"""Admission control: at most `max_concurrency` Generate/Score calls in flight; the next one is
refused with RESOURCE_EXHAUSTED (clients back off and retry) rather than queued without bound."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from lens_serve import metrics
from lens_serve.errors import Overloaded


class Admission:
    def __init__(self, max_concurrency: int) -> None:
        self._max = max_concurrency
        self._in_flight = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self._in_flight >= self._max:
            raise Overloaded(
                f"{self._in_flight} requests in flight (max_concurrency); retry with backoff"
            )
        self._in_flight += 1
        metrics.RPCS_IN_FLIGHT.inc()
        try:
            yield
        finally:
            self._in_flight -= 1
            metrics.RPCS_IN_FLIGHT.dec()
