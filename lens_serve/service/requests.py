"""The domain's request and response types: what the servicer converts protos to and from (no gRPC
types here, so the service can be driven and tested without a server)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lens_serve.core.context import WorkingContext
from lens_serve.engine.protocol import TokenLogprobs


@dataclass(frozen=True)
class Sampling:
    """Zeros mean the server's defaults (no penalty, all tokens, top_p 1, repetition_penalty 1)."""

    max_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 0.0
    logprobs: int | None = None
    """None: no log-probabilities; N: each generated token's and the N most likely ones'."""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    """"system", "user" or "assistant"."""
    content: str


@dataclass(frozen=True)
class GenerateInput:
    session_id: str = ""
    prompt: str = ""
    prompt_token_ids: tuple[int, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    wc_budget: int = 0
    policy: str = ""
    chat: bool = False
    idempotency_key: str = ""
    """With a session: a retry with the same key neither appends the prompt twice nor answers
    twice (a completed turn is replayed from the session)."""
    messages: tuple[ChatMessage, ...] = ()
    """A chat, the prompt once rendered with the model's chat template (instead of `prompt`)."""


@dataclass(frozen=True)
class ScoreInput:
    session_id: str = ""
    context: str = ""
    context_token_ids: tuple[int, ...] = ()
    continuation: str = ""
    continuation_token_ids: tuple[int, ...] = ()
    wc_budget: int = 0
    policy: str = ""
    query: str = ""
    query_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ContextQuery:
    """What a working context is chosen for, and where that came from."""

    token_ids: list[int] | None
    """None: the newest tokens (the chooser's default)."""
    source: str
    """"prompt" (a session's new prompt), "query" (the request's query field) or "newest"."""

    @property
    def tokens(self) -> int:
        return len(self.token_ids or ())


@dataclass(frozen=True)
class ContextView:
    """A chosen working context with what the caller needs to report it."""

    working_context: WorkingContext
    budget: int
    gistnet_version: str
    choice_ms: float
    query_source: str
    query_tokens: int


@dataclass(frozen=True)
class Usage:
    lifetime_tokens: int
    wc_rows: int
    gist_covered_tokens: int
    lens_version: str
    wc_choice_ms: float
    completion_tokens: int
    cached_rows: int
    prompt_tokens: int
    policy: str
    gistnet_version: str
    query_source: str
    query_tokens: int
    replayed: bool = False
    """An earlier request with this idempotency key completed the turn: this is its stored
    answer (nothing was generated or appended; the WC fields are zero)."""


@dataclass(frozen=True)
class GenerateEvent:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str = ""
    usage: Usage | None = None
    logprobs: list[TokenLogprobs] | None = None
    """With `Sampling.logprobs`: one entry per token in `token_ids`."""
    view: ContextView | None = None
    """On the last event: the working context the answer was generated from (None on a replay)."""


@dataclass(frozen=True)
class ScoreResult:
    token_nll: list[float]
    continuation_token_ids: list[int]
    view: ContextView

    @property
    def mean_nll(self) -> float:
        return sum(self.token_nll) / len(self.token_nll)
