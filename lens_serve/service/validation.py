"""Request validation: every field a client sends is checked here, before anything is written, and
refused with an `InvalidRequest` that names the field."""

from __future__ import annotations

import math
from collections.abc import Sequence

from lens_serve.core.context import validate_budget
from lens_serve.core.policies import POLICIES, check_feasible
from lens_serve.engine.protocol import Engine, GenerationParams
from lens_serve.errors import InvalidRequest
from lens_serve.service.config import Settings
from lens_serve.service.requests import ContextQuery, GenerateInput, Sampling

MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
MAX_TEMPERATURE = 10.0
DEFAULT_POLICY = "lens"


class RequestValidator:
    """Turns a request's raw fields into checked values: token ids, budget, policy, sampling."""

    def __init__(self, settings: Settings, engine: Engine, vocab_size: int, frame_rows: int):
        self._settings = settings
        self._engine = engine
        self._vocab_size = vocab_size
        self._frame_rows = frame_rows
        """Rows the gists' frame adds to a working context (budgets must leave room for it)."""

    def budget(self, wc_budget: int) -> int:
        s = self._settings
        budget = wc_budget or s.wc_budget
        if budget > s.max_wc_budget:
            raise InvalidRequest(
                "wc_budget", f"{budget} exceeds this server's max of {s.max_wc_budget}"
            )
        validate_budget(budget, s.tail)
        return budget

    @staticmethod
    def policy(policy: str) -> str:
        name = policy or DEFAULT_POLICY
        if name not in POLICIES:
            raise InvalidRequest("policy", f"must be one of {POLICIES}, got {policy!r}")
        return name

    def feasible(self, lifetime: int, budget: int, policy: str) -> None:
        """Refuse an impossible budget before anything is written (the chooser's own rules)."""
        s = self._settings
        check_feasible(
            policy, lifetime, budget, s.tail, s.block_size, s.gist_rows, self._frame_rows
        )

    def params(self, sampling: Sampling, budget: int) -> GenerationParams:
        s = self._settings
        max_model_len = self._engine.max_model_len
        max_tokens = sampling.max_tokens or s.max_tokens
        if max_tokens > s.max_completion_tokens:
            raise InvalidRequest(
                "sampling.max_tokens", f"{max_tokens} exceeds the max of {s.max_completion_tokens}"
            )
        if budget + max_tokens > max_model_len:
            raise InvalidRequest(
                "sampling.max_tokens",
                f"a {budget}-row context plus {max_tokens} tokens exceeds the model's "
                f"{max_model_len} positions",
            )
        if (
            not math.isfinite(sampling.temperature)
            or not 0 <= sampling.temperature <= MAX_TEMPERATURE
        ):
            raise InvalidRequest("sampling.temperature", f"must be in [0, {MAX_TEMPERATURE}]")
        top_p = sampling.top_p or 1.0
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise InvalidRequest("sampling.top_p", "must be in (0, 1]")
        if len(sampling.stop) > MAX_STOP_STRINGS or any(
            not stop or len(stop) > MAX_STOP_CHARS for stop in sampling.stop
        ):
            raise InvalidRequest(
                "sampling.stop",
                f"at most {MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_CHARS} chars",
            )
        return GenerationParams(
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=top_p,
            seed=sampling.seed or None,
            stop=sampling.stop,
        )

    def prompt_ids(self, request: GenerateInput) -> list[int]:
        if request.prompt and request.prompt_token_ids:
            raise InvalidRequest("prompt", "give prompt or prompt_token_ids, not both")
        if request.prompt_token_ids:
            if request.chat:
                raise InvalidRequest("chat", "the chat template applies to a text prompt only")
            return self.token_ids(request.prompt_token_ids, "prompt_token_ids")
        if not request.prompt:
            raise InvalidRequest("prompt", "must not be empty")
        if request.chat:
            return self._engine.apply_chat_template([{"role": "user", "content": request.prompt}])
        return self.encode(request.prompt)

    def query(self, text: str, ids: Sequence[int]) -> ContextQuery:
        """The request's `query` / `query_token_ids`, or the newest tokens when it gives none."""
        token_ids = self.text_or_ids(text, ids, "query")
        return ContextQuery(token_ids, "query") if token_ids else ContextQuery(None, "newest")

    def prompt_query(self, request: GenerateInput, prompt: list[int]) -> ContextQuery:
        """A new prompt is what the request asks: with chat, the user's message alone (the
        template's tokens would match every earlier turn)."""
        return ContextQuery(self.encode(request.prompt) if request.chat else prompt, "prompt")

    def text_or_ids(self, text: str, ids: Sequence[int], field_name: str) -> list[int]:
        """One of `<field>` (text) and `<field>_token_ids`, as token ids."""
        if text and ids:
            raise InvalidRequest(
                field_name, f"give {field_name} or {field_name}_token_ids, not both"
            )
        return self.token_ids(ids, f"{field_name}_token_ids") if ids else self.encode(text)

    def encode(self, text: str) -> list[int]:
        return self._engine.encode(text) if text else []

    def token_ids(self, ids: Sequence[int], field_name: str) -> list[int]:
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise InvalidRequest(
                field_name, f"ids must lie in [0, {self._vocab_size}), got {bad[:3]}"
            )
        return list(ids)

    @staticmethod
    def session_id(session_id: str) -> str:
        if not session_id:
            raise InvalidRequest("session_id", "must not be empty")
        return session_id
