"""A real LensServe stack for integration tests: the session's vLLM engine (tiny model), a real
redis-server, the production build_server with the real servicers on 127.0.0.1:0."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from lens_serve.engine.vllm import VllmEngine
from lens_serve.service.config import Settings
from lens_serve.service.inprocess import Stack
from lens_serve.service.inprocess import serving_stack as _serving_stack

__all__ = ["BASE_SETTINGS", "Stack", "serving_stack"]

# The test engine's context is 2048 positions (tests/fixtures_engine.py).
BASE_SETTINGS: dict[str, Any] = dict(
    host="127.0.0.1", port=0, wc_budget=256, max_wc_budget=1024, tail=32, max_model_len=2048,
    max_tokens=8, max_completion_tokens=512, max_session_tokens=200_000, lens_poll_seconds=0.1,
)  # fmt: skip


@contextlib.asynccontextmanager
async def serving_stack(
    engine: VllmEngine, model_dir: Path, redis_url: str, **overrides: Any
) -> AsyncIterator[Stack]:
    settings = Settings(model=str(model_dir), redis_url=redis_url, **{**BASE_SETTINGS, **overrides})
    async with _serving_stack(settings, engine) as stack:
        yield stack
