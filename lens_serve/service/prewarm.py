"""Next-turn prefill: after a session turn, prefill the next turn's prefix in the background.

vLLM never reuses the KV of decoded tokens for a later prompt of embeddings (it hashes decoded
tokens by id and prompt rows by their bytes), so without this every turn recomputes the previous
answer before its first token. The next turn's WC starts with exactly these rows whenever it only
appends: `LensService` refits the WC ahead of a turn that would not fit (the refit is then prefilled
here, while the user reads the answer)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable

import torch

from lens_serve import metrics
from lens_serve.aio import cancel_and_wait
from lens_serve.engine.protocol import Engine, GenerationParams

logger = logging.getLogger(__name__)

PREWARM_PRIORITY = 5
"""vLLM priority of next-turn prefills: after user requests (0), before shadow scoring (10)."""


class Prewarmer:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(self, next_rows: Awaitable[torch.Tensor | None]) -> None:
        """Prefill the rows `next_rows` gives (rows, D; None: nothing) at PREWARM_PRIORITY, in
        the background."""
        task = asyncio.create_task(self._prefill(next_rows, f"prewarm-{uuid.uuid4().hex}"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Wait for the prefills started so far (tests and benchmarks)."""
        await asyncio.gather(*self._tasks)

    async def aclose(self) -> None:
        await cancel_and_wait(self._tasks)

    async def _prefill(self, next_rows: Awaitable[torch.Tensor | None], request_id: str) -> None:
        try:
            rows = await next_rows
            if rows is None or rows.shape[0] >= self._engine.max_model_len:
                return
            params = GenerationParams(max_tokens=1, temperature=0.0)
            async for _ in self._engine.generate(rows, params, request_id, PREWARM_PRIORITY):
                pass
            metrics.PREWARMED_ROWS_TOTAL.inc(rows.shape[0])
        except Exception as e:  # an optimisation only: the next turn just computes more
            logger.warning("prewarm %s failed: %r", request_id, e)
