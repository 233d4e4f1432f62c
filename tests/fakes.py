"""FakeEngine: follows the Engine protocol without vLLM, for fast servicer/service unit tests only.
The real engine is exercised by tests/engine/test_vllm.py and the integration tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence

import torch

from lens_serve.core.embedding import EmbeddingTable
from lens_serve.engine.protocol import (
    EngineStats,
    GenerationChunk,
    GenerationParams,
    Logprob,
    TokenLogprobs,
)

FAKE_LOGPROB = -0.5
"""The fake's log-probability of its token 7; the next most likely tokens are 8, 9, ... with one
nat less each."""


class FakeEngine:
    """Bytes-as-tokens tokenizer; generation streams `max_tokens` copies of token 7 (or waits on
    `gate` between tokens when a test needs a stream held open). `params` records what each
    generate was asked with."""

    def __init__(self, table: EmbeddingTable, max_model_len: int = 4096) -> None:
        self.table = table
        self._max_model_len = max_model_len
        self.gate: asyncio.Event | None = None
        self.prompts: list[torch.Tensor] = []
        self.params: list[GenerationParams] = []
        self.aborted: list[str] = []

    @property
    def hidden_size(self) -> int:
        return self.table.hidden_size

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self.table.vocab_size

    @property
    def eos_token_id(self) -> int | None:
        return 2

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return [3 + b for b in text.encode()]

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return bytes(max(0, i - 3) % 256 for i in token_ids).decode(errors="replace")

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Each message as 0, its role and ": " (none for "user"), its content, 1."""
        ids = []
        for message in messages:
            role = "" if message["role"] == "user" else f"{message['role']}: "
            ids += [0, *self.encode(role + message["content"]), 1]
        return ids

    def embed(self, token_ids: Sequence[int]) -> torch.Tensor:
        return self.table(torch.tensor(list(token_ids)))

    async def generate(
        self,
        prompt_embeds: torch.Tensor,
        params: GenerationParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[GenerationChunk]:
        self.prompts.append(prompt_embeds)
        self.params.append(params)
        rows = int(prompt_embeds.shape[0])
        logprobs = None
        if params.logprobs is not None:
            top = [Logprob(7 + k, self.decode([7 + k]), FAKE_LOGPROB - k) for k in range(20)]
            logprobs = [TokenLogprobs(top[0], top[: params.logprobs])]
        try:
            for i in range(params.max_tokens):
                if self.gate is not None:
                    await self.gate.wait()
                await asyncio.sleep(0)
                last = i == params.max_tokens - 1
                finish = "length" if last else None
                yield GenerationChunk([7], "\x04", finish, None, rows, 0, logprobs)
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise

    async def score(
        self,
        context_embeds: torch.Tensor,
        continuation_ids: Sequence[int],
        request_id: str,
        priority: int = 0,
    ) -> list[float]:
        return [-0.5] * len(continuation_ids)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def check_health(self) -> None:
        return None

    async def is_healthy(self) -> bool:
        return True

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0.0, 0, 0, None)

    async def shutdown(self) -> None:
        return None
