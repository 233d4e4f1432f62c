"""Request validation: every field a client sends is checked here, before anything is written, and
refused with an `InvalidRequest` that names the field."""

from __future__ import annotations

import asyncio
import math
import re
from array import array
from collections.abc import Callable, Sequence

from lens_serve.core.context import validate_budget
from lens_serve.core.policies import POLICIES, check_feasible
from lens_serve.engine.protocol import MAX_LOGPROBS, Engine, GenerationParams
from lens_serve.errors import InvalidRequest, LimitExceeded, echo
from lens_serve.service.config import Settings
from lens_serve.service.requests import ChatMessage, ContextQuery, GenerateInput, Sampling

MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
MAX_TEMPERATURE = 10.0
MAX_PENALTY = 2.0  # presence and frequency penalties: OpenAI's range
# At 2 a repetition penalty already halves every repeated token's logit: a larger value is more
# likely a typo (12 for 1.2) than a wish.
MAX_REPETITION_PENALTY = 2.0
CHAT_ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 1024  # a chat's messages are rendered in one template call
DEFAULT_POLICY = "lens"
# Session ids are 32 hex characters (uuid4). A longer value is no id at all (say, a document pasted
# into the wrong field): INVALID_ARGUMENT tells the client which field to fix, where NOT_FOUND
# would tell it to create a session and re-append (docs/design.md §7). Shorter wrong ids stay
# NOT_FOUND: a typo or an expired id is an unknown session. 64 leaves room for a longer id format.
MAX_SESSION_ID_CHARS = 64
MAX_IDEMPOTENCY_KEY_CHARS = 128  # room for a UUID or a client's request id with a prefix
_KEY_CHARS = re.compile(r"[A-Za-z0-9._:-]+")


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
            raise InvalidRequest("policy", f"must be one of {POLICIES}, got {echo(policy)}")
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
        if sampling.top_k < 0:
            raise InvalidRequest("sampling.top_k", "must be >= 0 (0: all tokens)")
        for name, penalty in (
            ("presence_penalty", sampling.presence_penalty),
            ("frequency_penalty", sampling.frequency_penalty),
        ):
            if not (math.isfinite(penalty) and -MAX_PENALTY <= penalty <= MAX_PENALTY):
                raise InvalidRequest(
                    f"sampling.{name}", f"must be in [-{MAX_PENALTY}, {MAX_PENALTY}]"
                )
        repetition_penalty = sampling.repetition_penalty or 1.0
        if not (
            math.isfinite(repetition_penalty) and 0 < repetition_penalty <= MAX_REPETITION_PENALTY
        ):
            raise InvalidRequest(
                "sampling.repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY}]"
            )
        if sampling.logprobs is not None and not 0 <= sampling.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest("sampling.logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        return GenerationParams(
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=top_p,
            seed=sampling.seed or None,
            stop=sampling.stop,
            top_k=sampling.top_k,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            repetition_penalty=repetition_penalty,
            logprobs=sampling.logprobs,
        )

    def prompt_ids(self, request: GenerateInput) -> list[int]:
        if request.messages:
            if request.prompt or request.prompt_token_ids:
                raise InvalidRequest(
                    "messages", "give one of prompt, prompt_token_ids and messages, not two"
                )
            return self._chat_template(self.messages(request.messages))
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

    @staticmethod
    def messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
        """A chat's messages as the chat template takes them."""
        if len(messages) > MAX_MESSAGES:
            raise InvalidRequest(
                "messages", f"at most {MAX_MESSAGES} messages, got {len(messages)}"
            )
        for i, message in enumerate(messages):
            if message.role not in CHAT_ROLES:
                raise InvalidRequest(
                    f"messages[{i}].role", f"must be one of {CHAT_ROLES}, got {echo(message.role)}"
                )
        return [{"role": m.role, "content": m.content} for m in messages]

    def _chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return self._engine.apply_chat_template(messages)
        except Exception as exc:
            # The template is the model's code: what it raises for a chat (its raise_exception on
            # an order of roles it does not take, say) is about these messages.
            raise InvalidRequest(
                "messages", f"the model's chat template refused them: {exc}"
            ) from exc

    def query(self, text: str, ids: Sequence[int]) -> ContextQuery:
        """The request's `query` / `query_token_ids`, or the newest tokens when it gives none."""
        token_ids = self.text_or_ids(text, ids, "query")
        return ContextQuery(token_ids, "query") if token_ids else ContextQuery(None, "newest")

    def prompt_query(self, request: GenerateInput, prompt: list[int]) -> ContextQuery:
        """A new prompt is what the request asks: with chat, the user's message alone (the
        template's tokens would match every earlier turn); with messages, the last user message
        (the whole prompt if none is)."""
        if request.messages:
            asked = [m.content for m in request.messages if m.role == "user" and m.content]
            return ContextQuery(self.encode(asked[-1]) if asked else prompt, "prompt")
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
        if len(session_id) > MAX_SESSION_ID_CHARS:
            raise InvalidRequest(
                "session_id",
                f"{echo(session_id)} is no session id (at most {MAX_SESSION_ID_CHARS} characters)",
            )
        return session_id

    @staticmethod
    def idempotency_key(key: str) -> str:
        """ "" (none) or a client's key: it names a Redis key, so it is short and plain."""
        if key and (len(key) > MAX_IDEMPOTENCY_KEY_CHARS or not _KEY_CHARS.fullmatch(key)):
            raise InvalidRequest(
                "idempotency_key",
                f"{echo(key)}: must be at most {MAX_IDEMPOTENCY_KEY_CHARS} characters of "
                "A-Z a-z 0-9 . _ : -",
            )
        return key

    def upload(self, max_tokens: int) -> Upload:
        """An Append's token ids, gathered as it streams, with at most `max_tokens` of them."""
        return Upload(
            self.encode,
            lambda ids: self.token_ids(ids, "token_ids"),
            max_bytes=self._settings.max_append_bytes,
            max_tokens=max_tokens,
        )


_PIECE_CHARS = 1 << 18
"""Most text one worker-thread call tokenizes: a cancelled upload leaves at most this much work
running, and the text waiting for its next piece stays this small."""
# Where text may be cut into pieces: a whitespace character after a non-whitespace one. Byte-level
# BPE pre-tokenizers (GPT-2's regex: the tiny model's and SmolLM2's) never put whitespace after
# other characters in one pre-token, and BPE never merges across pre-tokens, so the two sides
# tokenize alone exactly as in the whole text. Only these four characters: Python's isspace()
# counts a few more (U+001C-U+001F) than the tokenizers' \s does.
_CUT_BEFORE = frozenset(" \t\n\r")


class Upload:
    """The token ids of one Append stream, gathered chunk by chunk so that a large upload neither
    blocks the event loop nor waits in memory as text: text is tokenized in pieces in a worker
    thread, and the stream is refused (`LimitExceeded`, before anything is written) as soon as it
    carries more than `max_bytes` of text or `max_tokens` tokens in all."""

    def __init__(
        self,
        encode: Callable[[str], list[int]],
        check_ids: Callable[[Sequence[int]], list[int]],
        *,
        max_bytes: int,
        max_tokens: int,
    ) -> None:
        self._encode = encode
        self._check_ids = check_ids
        self._max_bytes = max_bytes
        self._max_tokens = max_tokens
        self._bytes = 0
        self._text = ""
        """Text not tokenized yet: a token may go on in the next chunk."""
        self._ids: array[int] = array("i")  # 4 bytes a token, not a Python int's 28 + 8

    async def add(self, part: str | Sequence[int]) -> None:
        """A text chunk or a run of token ids."""
        if isinstance(part, str):
            await self.add_text(part)
        else:
            await self.add_ids(part)

    async def add_text(self, text: str) -> None:
        self._bytes += len(text.encode())
        if self._bytes > self._max_bytes:
            raise LimitExceeded(
                "text", f"an Append carries at most {self._max_bytes} bytes of text"
            )
        self._text += text
        while len(self._text) > _PIECE_CHARS:
            await self._encode_piece()

    async def add_ids(self, ids: Sequence[int]) -> None:
        await self._flush()  # text before these ids tokenizes up to them
        self._count(len(ids), "token_ids")
        self._ids.extend(await asyncio.to_thread(self._check_ids, ids))

    async def finish(self) -> array[int]:
        """All the token ids, in stream order."""
        await self._flush()
        return self._ids

    async def _flush(self) -> None:
        while self._text:
            await self._encode_piece()

    async def _encode_piece(self) -> None:
        ids, self._text = await asyncio.to_thread(_encode_piece, self._encode, self._text)
        self._count(len(ids), "text")
        self._ids.extend(ids)

    def _count(self, more: int, field_name: str) -> None:
        if len(self._ids) + more > self._max_tokens:
            raise LimitExceeded(
                field_name,
                f"the Append comes to more than {self._max_tokens} tokens, more than the "
                "session can take",
            )


def _encode_piece(encode: Callable[[str], list[int]], text: str) -> tuple[list[int], str]:
    """Tokenizes the longest prefix of `text` (at most _PIECE_CHARS) that ends where it may be cut;
    returns its ids and the rest. Text that fits one piece is tokenized whole. A run of over
    _PIECE_CHARS characters with no place to cut is cut anyway (its ids may differ from the whole
    text's where it is cut): waiting for its end could hold all of it in memory."""
    if len(text) <= _PIECE_CHARS:
        return encode(text), ""
    cut = next(
        (
            i
            for i in range(_PIECE_CHARS, 0, -1)
            if text[i] in _CUT_BEFORE and not text[i - 1].isspace()
        ),
        _PIECE_CHARS,
    )
    return encode(text[:cut]), text[cut:]
