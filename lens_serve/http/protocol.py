"""The OpenAI request bodies lens-serve takes, as pydantic models, and their conversion to the
domain's `GenerateInput`. Fields it does not serve (tools, logit_bias, response_format, ...) are
refused by name rather than ignored."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lens_serve.errors import InvalidRequest
from lens_serve.service.requests import ChatMessage, GenerateInput, Sampling

MAX_CHOICES = 16
"""Most choices (`n`) one request may ask for: each is a generation of its own (over the same rows,
which the prefix cache shares), and one call should not take half of the concurrency limit."""
_ROLES = {"developer": "system"}
"""OpenAI roles the chat templates do not know, and the role that means the same."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LensOptions(_Body):
    """lens-serve's extension: the body's `lens` object (OpenAI SDKs: `extra_body={"lens": {...}}`).
    Zeros and empty strings mean the server's defaults, as over gRPC."""

    session_id: str = ""
    """A session to continue: the prompt (or the rendered messages) and the answer are appended
    to it, and the working context is chosen over its whole history."""
    wc_budget: int = Field(default=0, ge=0)
    """Working-context budget in rows."""
    policy: str = ""
    """lens, retrieval, recency, uniform, random or full."""
    idempotency_key: str = ""
    """With a session: makes the turn safe to retry (docs/design.md §7)."""


class StreamOptions(_Body):
    include_usage: bool = False
    """Send a last chunk with no choices and the usage (with its `lens` object)."""


class _Generation(_Body):
    """What completions and chat completions share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    """vLLM's extension; 0 or -1: all tokens."""
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    """vLLM's extension; it counts the generated tokens only."""
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    """Accepted and ignored (an end-user id for abuse monitoring, in OpenAI's API)."""
    lens: LensOptions = LensOptions()

    def sampling(self, logprobs: int | None, max_tokens: int | None) -> Sampling:
        if self.seed is not None and self.seed < 1:
            # Over gRPC 0 means "no seed"; a client asking for seed 0 wants reproducible output.
            raise InvalidRequest("seed", "must be >= 1 (lens-serve takes 0 as no seed)")
        return Sampling(
            max_tokens=max_tokens or 0,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p or 0.0,
            seed=self.seed or 0,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            top_k=0 if self.top_k == -1 else self.top_k or 0,  # -1: vLLM's old "all tokens"
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 0.0,
            logprobs=logprobs,
        )

    def check_choices(self) -> None:
        if self.n > 1 and self.lens.session_id:
            raise InvalidRequest("n", "must be 1 in a session: a session turn appends one answer")


class CompletionRequest(_Generation):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str]
    """Text or token ids; a list of texts is taken only with one text in it (no batches)."""
    logprobs: int | None = Field(default=None, ge=0)
    """Each token's log-probability and those of this many most likely tokens."""

    def generate_input(self) -> GenerateInput:
        self.check_choices()
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) > 1:
                raise InvalidRequest("prompt", "one prompt per request (no batches)")
            prompt = prompt[0]
        text, ids = (prompt, ()) if isinstance(prompt, str) else ("", tuple(map(int, prompt)))
        return GenerateInput(
            session_id=self.lens.session_id,
            prompt=text,
            prompt_token_ids=ids,
            sampling=self.sampling(self.logprobs, self.max_tokens),
            wc_budget=self.lens.wc_budget,
            policy=self.lens.policy,
            idempotency_key=self.lens.idempotency_key,
        )


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: str
    """system (or developer), user or assistant."""
    content: str | list[TextPart]

    def chat_message(self) -> ChatMessage:
        content = self.content
        text = content if isinstance(content, str) else "".join(part.text for part in content)
        return ChatMessage(_ROLES.get(self.role, self.role), text)


class ChatCompletionRequest(_Generation):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """OpenAI's newer name for max_tokens; wins when both are given."""
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    """With logprobs: also the log-probabilities of this many most likely tokens."""

    def generate_input(self) -> GenerateInput:
        self.check_choices()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs", "needs logprobs: true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return GenerateInput(
            session_id=self.lens.session_id,
            sampling=self.sampling(logprobs, self.max_completion_tokens or self.max_tokens),
            wc_budget=self.lens.wc_budget,
            policy=self.lens.policy,
            idempotency_key=self.lens.idempotency_key,
            messages=tuple(message.chat_message() for message in self.messages),
        )
