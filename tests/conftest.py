"""Shared pytest fixtures. Each area keeps its fixtures in its own plugin module."""

pytest_plugins = [
    "tests.fixtures_models",
    "tests.fixtures_redis",
    "tests.fixtures_engine",
    "tests.fixtures_tracing",
]
