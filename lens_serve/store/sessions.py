"""Redis-backed session token log: the append-only lifetime context of each session.

Layout (docs/design.md §4 `lens:session:<id>`): a hash `lens:session:<id>` holds the metadata
(owner,
model, created_at) and a string `lens:session:<id>:tokens` the token ids packed as little-endian
int32, so an append is one O(new tokens) Redis APPEND and a reader that already holds the first N
tokens fetches only the rest with GETRANGE. Both keys share one TTL, refreshed on every append.
Checks and writes run in Lua scripts, so each append is atomic and a rejected one changes nothing.
"""

import hashlib
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from lens_serve.errors import LensError

SESSION_KEY_PREFIX = "lens:session:"
TOKENS_KEY_SUFFIX = ":tokens"
WRITE_KEY_INFIX = ":write:"
# Metadata hash fields.
FIELD_OWNER = "owner"
FIELD_MODEL = "model"
FIELD_CREATED_AT = "created_at"

TOKEN_DTYPE = np.dtype("<i4")
_TOKEN_BYTES = TOKEN_DTYPE.itemsize
_INT32_MAX = 2**31 - 1
# Redis strings hold at most 512 MiB.
_MAX_TOKENS_LIMIT = 512 * 1024 * 1024 // _TOKEN_BYTES
# Ids are uuid4 hex; anything else is refused before it reaches a key name, so a crafted id
# (e.g. "<id>:tokens") can never address another session's keys.
_SESSION_ID = re.compile(r"[0-9a-f]{32}")


def session_key(session_id: str) -> str:
    """The metadata hash of a session."""
    return f"{SESSION_KEY_PREFIX}{session_id}"


def tokens_key(session_id: str) -> str:
    """The packed token log (string) of a session."""
    return f"{SESSION_KEY_PREFIX}{session_id}{TOKENS_KEY_SUFFIX}"


def write_key(session_id: str, idempotency_key: str) -> str:
    """The record (hash) of what one idempotency key's writes appended to a session."""
    return f"{SESSION_KEY_PREFIX}{session_id}{WRITE_KEY_INFIX}{idempotency_key}"


class SessionError(LensError):
    """Base class of session store errors."""

    def __init__(self, session_id: str, message: str) -> None:
        super().__init__(message)
        self.session_id = session_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.session_id!r}, {str(self)!r})"


class SessionNotFound(SessionError):
    """No such session for this owner (also raised for another owner's session)."""

    status = "NOT_FOUND"

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id, f"session_id {session_id!r}: session not found")


class SessionFull(SessionError):
    """The append would take the session past `max_tokens`; nothing was appended."""

    status = "RESOURCE_EXHAUSTED"  # a per-session quota

    def __init__(
        self, session_id: str, lifetime_tokens: int, appended: int, max_tokens: int
    ) -> None:
        super().__init__(
            session_id,
            f"session_id {session_id!r}: appending {appended} token_ids to {lifetime_tokens} "
            f"would exceed the session limit of {max_tokens} tokens",
        )
        self.lifetime_tokens = lifetime_tokens
        self.appended = appended
        self.max_tokens = max_tokens


class SessionModelMismatch(SessionError):
    """The session was created for another model than the one this server runs."""

    status = "FAILED_PRECONDITION"

    def __init__(self, session_id: str, session_model: str, model: str) -> None:
        super().__init__(
            session_id,
            f"session_id {session_id!r}: session was created for model {session_model!r}, "
            f"this server runs {model!r}",
        )
        self.session_model = session_model
        self.model = model


class InvalidTokenIds(SessionError, ValueError):
    """`token_ids` is not a flat sequence of ints in [0, 2**31 - 1]; nothing was appended."""

    status = "INVALID_ARGUMENT"

    def __init__(self, session_id: str, detail: str) -> None:
        super().__init__(session_id, f"session_id {session_id!r}: token_ids {detail}")


@dataclass(frozen=True, slots=True)
class Once:
    """Makes an append idempotent: `key` (the client's idempotency key) names a write record, and
    a `part` of it that the record already holds is never appended twice."""

    key: str
    part: str  # "append" (an Append), "prompt" or "answer" (a session Generate)
    ttl_s: int
    """How long the record is kept: the window in which a retry is recognised."""
    finish_reason: str = ""  # kept with an answer, so a retried turn can be replayed


@dataclass(frozen=True, slots=True)
class WriteRecord:
    """What the writes of one idempotency key appended: each part's [start, end) in tokens."""

    parts: dict[str, tuple[int, int]]
    finish_reason: str = ""


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What the store knows about a session."""

    session_id: str
    owner: str
    model: str
    created_at: float
    """Unix time (seconds) of creation."""
    lifetime_tokens: int


class _LuaScript:
    """EVALSHA with a fallback to EVAL (which caches the script) after a Redis restart/flush."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, redis: Redis, keys: Sequence[str], args: Sequence[str | bytes]) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await redis.eval(self.source, len(keys), *keys, *args)


# Status codes the scripts return first.
_OK, _NOT_FOUND, _MODEL_MISMATCH, _FULL, _DONE_BEFORE = 0, 1, 2, 3, 4

# KEYS: meta, tokens[, write record]. ARGV: owner, model, packed tokens, max bytes, ttl seconds[,
# part, record ttl seconds, finish reason]. With a write record, a part it already holds is not
# appended again. Returns {status, lifetime bytes or the session's model}.
_APPEND = _LuaScript(
    """
local meta = redis.call('HMGET', KEYS[1], 'owner', 'model')
if meta[1] ~= ARGV[1] or redis.call('EXISTS', KEYS[2]) == 0 then return {1, 0} end
if meta[2] ~= ARGV[2] then return {2, meta[2]} end
local len = redis.call('STRLEN', KEYS[2])
if KEYS[3] and redis.call('HEXISTS', KEYS[3], ARGV[6]) == 1 then return {4, len} end
if len + string.len(ARGV[3]) > tonumber(ARGV[4]) then return {3, len} end
local start = len
if string.len(ARGV[3]) > 0 then len = redis.call('APPEND', KEYS[2], ARGV[3]) end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
if KEYS[3] then
  redis.call('HSET', KEYS[3], ARGV[6], start .. ' ' .. len)
  if ARGV[8] ~= '' then redis.call('HSET', KEYS[3], 'finish', ARGV[8]) end
  redis.call('EXPIRE', KEYS[3], ARGV[7])
end
return {0, len}
"""
)

# KEYS: meta, tokens. ARGV: owner. Returns 1 if deleted, 0 if not found for this owner.
_DELETE = _LuaScript(
    """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""
)


class SessionStore:
    """Sessions of one model in Redis. The client must return bytes (no `decode_responses`)."""

    def __init__(self, redis: Redis, ttl_s: int, max_tokens: int, model: str) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        if not 0 < max_tokens <= _MAX_TOKENS_LIMIT:
            raise ValueError(f"max_tokens must be in [1, {_MAX_TOKENS_LIMIT}], got {max_tokens}")
        if not model:
            raise ValueError("model must be a non-empty name")
        if redis.connection_pool.connection_kwargs.get("decode_responses", False):
            raise ValueError("SessionStore needs a Redis client without decode_responses")
        self._redis = redis
        self.ttl_s = ttl_s
        self.max_tokens = max_tokens
        self.model = model

    async def create(self, owner: str) -> SessionInfo:
        """Creates an empty session owned by `owner`."""
        session_id = uuid.uuid4().hex
        created_at = time.time()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                session_key(session_id),
                mapping={
                    FIELD_OWNER: owner,
                    FIELD_MODEL: self.model,
                    FIELD_CREATED_AT: repr(created_at),
                },
            )
            pipe.expire(session_key(session_id), self.ttl_s)
            # The tokens key exists from the start (empty), so a missing one means lost data.
            pipe.set(tokens_key(session_id), b"", ex=self.ttl_s)
            await pipe.execute()
        return SessionInfo(session_id, owner, self.model, created_at, 0)

    async def get(self, session_id: str, owner: str) -> SessionInfo:
        """The session's metadata and lifetime length."""
        self._check_id(session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hmget(session_key(session_id), [FIELD_OWNER, FIELD_MODEL, FIELD_CREATED_AT])
            pipe.exists(tokens_key(session_id))
            pipe.strlen(tokens_key(session_id))
            (stored_owner, model, created_at), exists, nbytes = await pipe.execute()
        self._check_meta(session_id, owner, stored_owner, model, exists)
        return SessionInfo(
            session_id, owner, self.model, float(created_at or 0), nbytes // _TOKEN_BYTES
        )

    async def append(
        self, session_id: str, owner: str, token_ids: Sequence[int], once: Once | None = None
    ) -> int:
        """Appends `token_ids` atomically and refreshes the TTL; returns the new lifetime length.
        With `once`, a part its record already holds appends nothing (see `append_once`).

        Raises SessionFull (and appends nothing) if the result would exceed `max_tokens`.
        """
        return (await self.append_once(session_id, owner, token_ids, once))[0]

    async def append_once(
        self, session_id: str, owner: str, token_ids: Sequence[int], once: Once | None
    ) -> tuple[int, bool]:
        """`append`, also saying whether this call appended (False: `once`'s record already held
        the part, so a retry of an ambiguous write changes nothing)."""
        self._check_id(session_id)
        packed = self._pack(session_id, token_ids)
        keys = [session_key(session_id), tokens_key(session_id)]
        args: list[str | bytes] = [
            owner, self.model, packed, str(self.max_tokens * _TOKEN_BYTES), str(self.ttl_s)
        ]  # fmt: skip
        if once is not None:
            keys.append(write_key(session_id, once.key))
            args += [once.part, str(once.ttl_s), once.finish_reason]
        status, value = await _APPEND(self._redis, keys, args)
        if status == _DONE_BEFORE:
            return int(value) // _TOKEN_BYTES, False
        if status == _NOT_FOUND:
            raise SessionNotFound(session_id)
        if status == _MODEL_MISMATCH:
            raise SessionModelMismatch(session_id, value.decode(errors="replace"), self.model)
        if status == _FULL:
            raise SessionFull(session_id, value // _TOKEN_BYTES, len(token_ids), self.max_tokens)
        if status != _OK:
            raise RuntimeError(f"session append script returned unknown status {status!r}")
        return int(value) // _TOKEN_BYTES, True

    async def write_record(self, session_id: str, owner: str, key: str) -> WriteRecord | None:
        """What the writes under idempotency key `key` appended to the session (None: nothing,
        or the record has expired)."""
        await self.get(session_id, owner)  # the record is only shown to the session's owner
        raw = cast(dict[bytes, bytes], await self._redis.hgetall(write_key(session_id, key)))
        if not raw:
            return None
        finish = raw.pop(b"finish", b"").decode()
        parts = {}
        for part, span in raw.items():
            start, end = (int(x) // _TOKEN_BYTES for x in span.split())
            parts[part.decode()] = (start, end)
        return WriteRecord(parts, finish)

    async def tokens(self, session_id: str, owner: str, start: int = 0) -> npt.NDArray[np.int32]:
        """Token ids from lifetime position `start` on (only those bytes are transferred)."""
        self._check_id(session_id)
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hmget(session_key(session_id), [FIELD_OWNER, FIELD_MODEL])
            pipe.exists(tokens_key(session_id))
            # Clamped so an absurd `start` still fits Redis's 64-bit range argument.
            offset = min(start, self.max_tokens) * _TOKEN_BYTES
            pipe.getrange(tokens_key(session_id), offset, -1)
            (stored_owner, model), exists, data = await pipe.execute()
        # Checked only after the read (one round trip); the data is dropped unless it passes.
        self._check_meta(session_id, owner, stored_owner, model, exists)
        # GETRANGE clamps to the string, so `start` past the end gives no tokens.
        return np.frombuffer(data, dtype=TOKEN_DTYPE).astype(np.int32)

    async def delete(self, session_id: str, owner: str) -> None:
        """Deletes the session (whatever its model: deleting needs no understanding of it)."""
        self._check_id(session_id)
        deleted = await _DELETE(
            self._redis, [session_key(session_id), tokens_key(session_id)], [owner]
        )
        if not deleted:
            raise SessionNotFound(session_id)

    @staticmethod
    def _check_id(session_id: str) -> None:
        if _SESSION_ID.fullmatch(session_id) is None:
            raise SessionNotFound(session_id)

    def _check_meta(
        self,
        session_id: str,
        owner: str,
        stored_owner: bytes | None,
        model: bytes | None,
        tokens_exist: int,
    ) -> None:
        # Another owner's session is indistinguishable from a missing one (no existence leak).
        if stored_owner is None or stored_owner != owner.encode() or not tokens_exist:
            raise SessionNotFound(session_id)
        if model != self.model.encode():
            raise SessionModelMismatch(
                session_id, (model or b"").decode(errors="replace"), self.model
            )

    @staticmethod
    def _pack(session_id: str, token_ids: Sequence[int]) -> bytes:
        try:
            ids = np.asarray(token_ids, dtype=np.int64)
        except (OverflowError, TypeError, ValueError) as e:
            raise InvalidTokenIds(session_id, f"must be ints in [0, {_INT32_MAX}]: {e}") from e
        if ids.ndim != 1:
            raise InvalidTokenIds(session_id, f"must be a flat sequence, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() > _INT32_MAX):
            bad = int(ids[(ids < 0) | (ids > _INT32_MAX)][0])
            raise InvalidTokenIds(session_id, f"must be in [0, {_INT32_MAX}], got {bad}")
        return ids.astype(TOKEN_DTYPE).tobytes()
