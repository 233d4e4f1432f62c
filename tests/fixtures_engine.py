"""vLLM engine fixture (pytest plugin, loaded from tests/conftest.py).

`vllm_engine` starts ONE real `VllmEngine` (float32, eager, on the tiny model from
`tiny_model_dir`) for the whole test session and shuts it down at the end. Measured on 2 shared
AVX2 cores: eager starts in ~20-27 s (compiled: ~27 s with a warm compile cache, ~47 s cold), and
float32 runs the tiny model 3-4x faster than bfloat16 on CPUs without AVX512-BF16/AMX; float32
also makes `score()` agree with a transformers forward to ~1e-6 nats. The bfloat16 path is
covered by one test that starts its own engine.

Async session fixtures live on the session's event loop (pytest-asyncio 1.5), so every test that
uses this fixture must run on that loop too; otherwise it fails with "attached to a different loop"
or hangs. Mark the module (or the single test)::

    pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.integration]

    async def test_something(vllm_engine: VllmEngine) -> None:
        rows = vllm_engine.embed(vllm_engine.encode("def f(x):"))   # (n, hidden)
        async for chunk in vllm_engine.generate(rows, GenerationParams(max_tokens=4), "t-1"):
            ...

Tests share the engine: use unique request ids, and do not rely on an empty prefix cache (use
fresh random rows when a test needs a cache miss) or on the engine being idle.
"""

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio

from lens_serve.engine.config import EngineConfig
from lens_serve.engine.vllm import VllmEngine


def tiny_engine_config(model_dir: Path, **overrides: Any) -> EngineConfig:
    """The test engine's config for `model_dir`, with `overrides` (e.g. dtype="float32")."""
    # Small enough for CI machines; the tests need at most ~2k positions per request.
    base = EngineConfig(
        model=str(model_dir),
        dtype="float32",
        max_model_len=2048,
        kv_cache_gib=1.0,
        enforce_eager=True,
        max_num_seqs=16,
        kv_block_size=32,  # the server's CPU default (Settings.kv_block_size)
    )
    return dataclasses.replace(base, **overrides)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_engine(tiny_model_dir: Path) -> AsyncIterator[VllmEngine]:
    engine = await VllmEngine.create(tiny_engine_config(tiny_model_dir))
    try:
        yield engine
    finally:
        await engine.shutdown()
