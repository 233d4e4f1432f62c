"""Tracing fixtures: `spans` turns lens-serve's tracing on for one test, into memory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lens_serve import tracing


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span the test makes, exported as it ends; tracing is off again afterwards."""
    exporter = InMemorySpanExporter()
    tracing.start(SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        tracing.shutdown()
