"""Shared pytest fixtures. Each area keeps its fixtures in its own plugin module."""

import logging
from collections.abc import Iterator

import pytest

pytest_plugins = [
    "tests.fixtures_models",
    "tests.fixtures_redis",
    "tests.fixtures_engine",
    "tests.fixtures_tracing",
]


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """The CLIs' `main` points the root logger at the stderr of the test calling it, which pytest
    closes with that test; later tests' log records would hit a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
