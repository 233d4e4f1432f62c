"""Next-turn prefill: after a session turn, prefill WC + answer in the background.

vLLM never reuses the KV of decoded tokens for a later prompt of embeddings (it hashes decoded
tokens by id and prompt rows by their bytes), so without this every turn recomputes the previous
answer before its first token. The next turn's WC starts with exactly these rows whenever the
allocator only appends (it keeps headroom for that)."""

from __future__ import annotations

import asyncio
import logging
import uuid

import torch

from lens_serve import metrics
from lens_serve.aio import cancel_and_wait
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.engine.protocol import Engine, GenerationParams

logger = logging.getLogger(__name__)

PREWARM_PRIORITY = 5
"""vLLM priority of next-turn prefills: after user requests (0), before shadow scoring (10)."""


class Prewarmer:
    def __init__(self, engine: Engine, table: EmbeddingTable) -> None:
        self._engine = engine
        self._table = table
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(self, wc_rows: torch.Tensor, answer: list[int]) -> None:
        """Prefill `wc_rows` (WC, D) + the answer's rows at PREWARM_PRIORITY, in the background."""
        rows = torch.cat([wc_rows, self._table(torch.tensor(answer))])  # (WC + answer, D)
        if rows.shape[0] >= self._engine.max_model_len:
            return
        task = asyncio.create_task(self._prefill(rows, f"prewarm-{uuid.uuid4().hex}"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Wait for the prefills started so far (tests and benchmarks)."""
        await asyncio.gather(*self._tasks)

    async def aclose(self) -> None:
        await cancel_and_wait(self._tasks)

    async def _prefill(self, rows: torch.Tensor, request_id: str) -> None:
        try:
            params = GenerationParams(max_tokens=1, temperature=0.0)
            async for _ in self._engine.generate(rows, params, request_id, PREWARM_PRIORITY):
                pass
            metrics.PREWARMED_ROWS_TOTAL.inc(rows.shape[0])
        except Exception as e:  # an optimisation only: the next turn just computes more
            logger.warning("prewarm %s failed: %r", request_id, e)
