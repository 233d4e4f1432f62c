"""What the service needs from an inference engine: the `Engine` protocol, its value types and its
errors. `VllmEngine` (engine/vllm.py) is the real one; unit tests may provide fakes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from lens_serve.errors import LensError

# --------------------------------------------------------------------------------------------------
# Errors


class EngineError(LensError):
    """vLLM failed a request for a reason that is not the client's (a bug, a recoverable fault)."""

    status = "INTERNAL"


class EngineDeadError(EngineError):
    """The vLLM engine core died or was shut down; nothing more will run until a restart."""

    status = "UNAVAILABLE"


class PromptLogprobsMissing(EngineError):
    """vLLM returned no prompt log-probabilities where we asked for them.

    This is the pure-`EmbedsPrompt` trap: with `prompt_logprobs` and no `prompt_token_ids`, vLLM has
    no target ids and silently returns `[None]`. Raised instead of returning garbage."""


MAX_LOGPROBS = 20
"""Most top log-probabilities per generated token a request may ask for (vLLM's default
`max_logprobs`, and OpenAI's limit on top_logprobs)."""


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings of one generate request. temperature 0 is greedy."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    top_k: int = 0
    """0: all tokens."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    """1: none. It counts generated tokens only (prompt rows are embeddings, not token ids)."""
    logprobs: int | None = None
    """None: no log-probabilities; N: each generated token's and the N most likely ones'."""


@dataclass(frozen=True)
class Logprob:
    token_id: int
    token: str
    """The token's text."""
    logprob: float


@dataclass(frozen=True)
class TokenLogprobs:
    """The log-probabilities at one generated position (under the model alone, before penalties
    and sampling settings)."""

    token: Logprob
    """The generated token."""
    top_logprobs: list[Logprob]
    """The `GenerationParams.logprobs` most likely tokens, most likely first."""


@dataclass(frozen=True)
class GenerationChunk:
    """One streamed delta of a generate request."""

    token_ids: list[int]
    """Tokens new in this chunk (may be empty, e.g. on an abort)."""
    text: str
    """Text new in this chunk."""
    finish_reason: str | None
    """None until the last chunk; then vLLM's reason: "stop", "length" or "abort"."""
    stop_reason: int | str | None
    """The stop string or stop token id that ended the request, if one did."""
    prompt_rows: int
    """Rows in the prompt (positions 0..prompt_rows-1)."""
    cached_rows: int
    """Prompt rows vLLM served from its prefix cache (0 until it reports them)."""
    logprobs: list[TokenLogprobs] | None = None
    """With `GenerationParams.logprobs`: one entry per token in `token_ids`."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of engine load, from vLLM's latest scheduler report."""

    unfinished_requests: int
    """Requests the frontend still tracks (streams not finished)."""
    running: int
    """Requests the scheduler ran in its last reported step."""
    waiting: int
    """Requests queued in the scheduler at its last reported step."""
    kv_cache_usage: float
    """Fraction of KV blocks in use, 0..1."""
    prefix_cache_queries: int
    """Prompt rows looked up in the prefix cache since start-up."""
    prefix_cache_hits: int
    """Of those, rows found in the cache."""
    updated_at: float | None
    """time.monotonic() of the last scheduler report (None before the first request)."""


class Engine(Protocol):
    """What the server needs from an inference engine. `VllmEngine` is the real one; tests may
    provide fakes. Prompt rows live in the model's input-embedding space, shape (n_rows, hidden);
    the engine assigns them positions 0..n_rows-1."""

    @property
    def hidden_size(self) -> int: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_id(self) -> int | None: ...

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> list[int]: ...

    def embed(self, token_ids: Sequence[int]) -> torch.Tensor: ...

    def generate(
        self,
        prompt_embeds: torch.Tensor,
        params: GenerationParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[GenerationChunk]: ...

    async def score(
        self,
        context_embeds: torch.Tensor,
        continuation_ids: Sequence[int],
        request_id: str,
        priority: int = 0,
    ) -> list[float]: ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None: ...

    async def is_healthy(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self) -> None: ...
