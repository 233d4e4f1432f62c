"""SessionStore against a real redis-server."""

import asyncio

import numpy as np
import pytest
from redis.asyncio import Redis

from lens_serve.store.sessions import (
    InvalidTokenIds,
    Once,
    SessionFull,
    SessionModelMismatch,
    SessionNotFound,
    SessionStore,
    WriteRecord,
    session_key,
    tokens_key,
    write_key,
)
from tests.fixtures_redis import RedisServerFactory

MODEL = "tiny"
TTL_S = 600


def _store(redis: Redis, *, max_tokens: int = 10_000, model: str = MODEL) -> SessionStore:
    return SessionStore(redis, TTL_S, max_tokens, model)


async def test_roundtrip_returns_appended_tokens_when_appended_twice(redis_client: Redis) -> None:
    store = _store(redis_client)
    created = await store.create("alice")
    assert created.lifetime_tokens == 0
    assert len(created.session_id) == 32

    assert await store.append(created.session_id, "alice", [1, 2, 3]) == 3
    assert await store.append(created.session_id, "alice", [4, 2**31 - 1]) == 5

    info = await store.get(created.session_id, "alice")
    assert (info.session_id, info.owner, info.model, info.lifetime_tokens) == (
        created.session_id,
        "alice",
        MODEL,
        5,
    )
    assert info.created_at == pytest.approx(created.created_at)
    tokens = await store.tokens(created.session_id, "alice")
    assert tokens.dtype == np.int32
    assert tokens.tolist() == [1, 2, 3, 4, 2**31 - 1]


async def test_new_session_is_empty_when_read(redis_client: Redis) -> None:
    store = _store(redis_client)
    session = await store.create("alice")
    assert (await store.get(session.session_id, "alice")).lifetime_tokens == 0
    assert (await store.tokens(session.session_id, "alice")).tolist() == []
    assert await store.append(session.session_id, "alice", []) == 0


async def test_tokens_returns_suffix_when_start_given(redis_client: Redis) -> None:
    store = _store(redis_client)
    session = await store.create("alice")
    await store.append(session.session_id, "alice", list(range(100)))
    assert (await store.tokens(session.session_id, "alice", start=97)).tolist() == [97, 98, 99]
    assert (await store.tokens(session.session_id, "alice", start=100)).tolist() == []
    assert (await store.tokens(session.session_id, "alice", start=2**80)).tolist() == []
    with pytest.raises(ValueError, match="start"):
        await store.tokens(session.session_id, "alice", start=-1)


async def test_tokens_is_writable_native_array_when_read(redis_client: Redis) -> None:
    store = _store(redis_client)
    session = await store.create("alice")
    await store.append(session.session_id, "alice", [7, 8])
    tokens = await store.tokens(session.session_id, "alice")
    tokens[0] = 1  # a copy, not a view of the Redis bytes
    assert tokens.dtype.isnative


async def test_other_owner_gets_not_found_when_accessing(redis_client: Redis) -> None:
    store = _store(redis_client)
    session = await store.create("alice")
    await store.append(session.session_id, "alice", [1, 2])
    sid = session.session_id
    with pytest.raises(SessionNotFound, match=sid):
        await store.get(sid, "mallory")
    with pytest.raises(SessionNotFound):
        await store.tokens(sid, "mallory")
    with pytest.raises(SessionNotFound):
        await store.append(sid, "mallory", [3])
    with pytest.raises(SessionNotFound):
        await store.delete(sid, "mallory")
    assert (await store.tokens(sid, "alice")).tolist() == [1, 2]


async def test_unknown_session_raises_not_found_when_accessed(redis_client: Redis) -> None:
    store = _store(redis_client)
    for sid in ("0" * 32, "not-a-session", "", f"{'a' * 32}:tokens"):
        with pytest.raises(SessionNotFound):
            await store.get(sid, "alice")
        with pytest.raises(SessionNotFound):
            await store.append(sid, "alice", [1])
        with pytest.raises(SessionNotFound):
            await store.tokens(sid, "alice")
        with pytest.raises(SessionNotFound):
            await store.delete(sid, "alice")
    assert await redis_client.dbsize() == 0


async def test_crafted_id_cannot_reach_tokens_key_when_used(redis_client: Redis) -> None:
    store = _store(redis_client)
    session = await store.create("alice")
    # "<id>:tokens" as an id would name the tokens key as a metadata hash; it must be refused.
    with pytest.raises(SessionNotFound):
        await store.append(session.session_id + ":tokens", "alice", [1])
    assert (await store.get(session.session_id, "alice")).lifetime_tokens == 0


async def test_append_rejected_and_session_unchanged_when_over_max_tokens(
    redis_client: Redis,
) -> None:
    store = _store(redis_client, max_tokens=5)
    session = await store.create("alice")
    sid = session.session_id
    await store.append(sid, "alice", [1, 2, 3])
    await redis_client.expire(session_key(sid), 100)
    await redis_client.expire(tokens_key(sid), 100)

    with pytest.raises(SessionFull, match="limit of 5 tokens") as excinfo:
        await store.append(sid, "alice", [4, 5, 6])
    assert (excinfo.value.lifetime_tokens, excinfo.value.appended) == (3, 3)
    assert sid in str(excinfo.value)

    assert (await store.tokens(sid, "alice")).tolist() == [1, 2, 3]
    # A rejected append does not even refresh the TTL.
    assert await redis_client.ttl(tokens_key(sid)) <= 100
    assert await store.append(sid, "alice", [4, 5]) == 5


async def test_append_rejected_and_session_unchanged_when_ids_invalid(
    redis_client: Redis,
) -> None:
    store = _store(redis_client)
    session = await store.create("alice")
    sid = session.session_id
    await store.append(sid, "alice", [1])
    for bad in ([2, -1], [2**31], [2**70]):
        with pytest.raises(InvalidTokenIds, match="token_ids"):
            await store.append(sid, "alice", bad)
    assert (await store.tokens(sid, "alice")).tolist() == [1]


async def test_other_model_raises_mismatch_when_accessed(redis_client: Redis) -> None:
    session = await _store(redis_client, model="model-a").create("alice")
    other = _store(redis_client, model="model-b")
    sid = session.session_id
    with pytest.raises(SessionModelMismatch, match="model-a"):
        await other.get(sid, "alice")
    with pytest.raises(SessionModelMismatch, match="model-b"):
        await other.append(sid, "alice", [1])
    with pytest.raises(SessionModelMismatch):
        await other.tokens(sid, "alice")
    assert (await _store(redis_client, model="model-a").get(sid, "alice")).lifetime_tokens == 0


async def test_ttl_is_set_when_created_and_refreshed_when_appended(redis_client: Redis) -> None:
    store = _store(redis_client)
    sid = (await store.create("alice")).session_id
    keys = (session_key(sid), tokens_key(sid))
    for key in keys:
        assert 0 < await redis_client.ttl(key) <= TTL_S

    for key in keys:
        await redis_client.expire(key, 5)
    await store.append(sid, "alice", [1])
    for key in keys:
        assert TTL_S - 5 < await redis_client.ttl(key) <= TTL_S


async def test_session_disappears_when_ttl_expires(redis_client: Redis) -> None:
    store = _store(redis_client)
    sid = (await store.create("alice")).session_id
    await store.append(sid, "alice", [1])
    for key in (session_key(sid), tokens_key(sid)):
        await redis_client.pexpire(key, 20)
    await asyncio.sleep(0.1)
    with pytest.raises(SessionNotFound):
        await store.get(sid, "alice")


async def test_session_not_found_when_token_log_lost(redis_client: Redis) -> None:
    store = _store(redis_client)
    sid = (await store.create("alice")).session_id
    await redis_client.delete(tokens_key(sid))  # e.g. evicted: never serve a truncated history
    with pytest.raises(SessionNotFound):
        await store.get(sid, "alice")
    with pytest.raises(SessionNotFound):
        await store.append(sid, "alice", [1])
    assert not await redis_client.exists(tokens_key(sid))


async def test_no_tokens_lost_when_appending_concurrently(redis_client: Redis) -> None:
    store = _store(redis_client)
    sid = (await store.create("alice")).session_id
    tasks, chunk = 50, 20

    async def writer(task: int) -> None:
        for _ in range(3):
            await store.append(sid, "alice", [task] * chunk)

    async with asyncio.TaskGroup() as group:
        for task in range(tasks):
            group.create_task(writer(task))

    tokens = (await store.tokens(sid, "alice")).tolist()
    assert len(tokens) == tasks * chunk * 3
    # Every append landed whole: the log is a sequence of uninterrupted chunks.
    chunks = [tokens[i : i + chunk] for i in range(0, len(tokens), chunk)]
    assert all(c == [c[0]] * chunk for c in chunks)
    assert sorted(c[0] for c in chunks) == sorted(list(range(tasks)) * 3)


async def test_concurrent_appends_stop_exactly_at_limit_when_full(redis_client: Redis) -> None:
    store = _store(redis_client, max_tokens=100)
    sid = (await store.create("alice")).session_id
    results = await asyncio.gather(
        *(store.append(sid, "alice", [i] * 7) for i in range(30)), return_exceptions=True
    )
    accepted = [r for r in results if isinstance(r, int)]
    assert len(accepted) == 100 // 7
    assert all(isinstance(r, SessionFull) for r in results if not isinstance(r, int))
    assert (await store.get(sid, "alice")).lifetime_tokens == 7 * (100 // 7)


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
async def test_session_survives_when_redis_restarts_with_aof(
    redis_server_factory: RedisServerFactory, hard: bool
) -> None:
    server = redis_server_factory(appendonly=True)
    client = Redis.from_url(server.url)
    try:
        store = _store(client)
        sid = (await store.create("alice")).session_id
        await store.append(sid, "alice", [1, 2, 3])
    finally:
        await client.aclose()

    await asyncio.to_thread(server.restart, hard=hard)

    client = Redis.from_url(server.url)
    try:
        store = _store(client)
        assert (await store.get(sid, "alice")).lifetime_tokens == 3
        # The Lua script cache is empty after the restart: EVALSHA must fall back to EVAL.
        assert await store.append(sid, "alice", [4]) == 4
        assert (await store.tokens(sid, "alice")).tolist() == [1, 2, 3, 4]
        assert 0 < await client.ttl(session_key(sid)) <= TTL_S
    finally:
        await client.aclose()


async def test_delete_removes_both_keys_when_owner_deletes(redis_client: Redis) -> None:
    store = _store(redis_client)
    sid = (await store.create("alice")).session_id
    await store.append(sid, "alice", [1])
    await store.delete(sid, "alice")
    assert not await redis_client.exists(session_key(sid), tokens_key(sid))
    with pytest.raises(SessionNotFound):
        await store.get(sid, "alice")
    with pytest.raises(SessionNotFound):
        await store.delete(sid, "alice")


async def test_delete_succeeds_when_session_has_other_model(redis_client: Redis) -> None:
    sid = (await _store(redis_client, model="model-a").create("alice")).session_id
    await _store(redis_client, model="model-b").delete(sid, "alice")
    assert not await redis_client.exists(session_key(sid))


def test_store_rejects_bad_settings_when_constructed() -> None:
    client = Redis()
    with pytest.raises(ValueError, match="ttl_s"):
        SessionStore(client, 0, 10, MODEL)
    with pytest.raises(ValueError, match="max_tokens"):
        SessionStore(client, 10, 0, MODEL)
    with pytest.raises(ValueError, match="model"):
        SessionStore(client, 10, 10, "")
    with pytest.raises(ValueError, match="decode_responses"):
        SessionStore(Redis(decode_responses=True), 10, 10, MODEL)


async def test_an_idempotent_append_is_applied_once(redis_client: Redis) -> None:
    store = _store(redis_client)
    sid = (await store.create("alice")).session_id
    once = Once("req-1", "append", ttl_s=60)
    assert await store.append_once(sid, "alice", [1, 2, 3], once) == (3, True)
    # A retry after an ambiguous failure (it was applied, the reply was lost) appends nothing.
    assert await store.append_once(sid, "alice", [1, 2, 3], once) == (3, False)
    assert await store.append(sid, "alice", [9], Once("req-2", "append", ttl_s=60)) == 4
    assert (await store.tokens(sid, "alice")).tolist() == [1, 2, 3, 9]
    record = await store.write_record(sid, "alice", "req-1")
    assert record is not None and record.parts == {"append": (0, 3)}
    assert 0 < await redis_client.ttl(write_key(sid, "req-1")) <= 60
    assert await store.write_record(sid, "alice", "never-used") is None
    with pytest.raises(SessionNotFound):
        await store.write_record(sid, "mallory", "req-1")


async def test_a_turns_prompt_and_answer_are_separate_parts_of_one_record(
    redis_client: Redis,
) -> None:
    store = _store(redis_client)
    sid = (await store.create("alice")).session_id
    await store.append(sid, "alice", [5, 5])
    assert await store.append(sid, "alice", [1, 2], Once("turn", "prompt", 60)) == 4
    assert await store.append(sid, "alice", [1, 2], Once("turn", "prompt", 60)) == 4  # a retry
    assert await store.append(sid, "alice", [7, 8, 9], Once("turn", "answer", 60, "stop")) == 7
    record = await store.write_record(sid, "alice", "turn")
    assert record == WriteRecord({"prompt": (2, 4), "answer": (4, 7)}, "stop")


async def test_a_refused_idempotent_append_leaves_no_record(redis_client: Redis) -> None:
    store = _store(redis_client, max_tokens=4)
    sid = (await store.create("alice")).session_id
    with pytest.raises(SessionFull):
        await store.append(sid, "alice", [1] * 5, Once("big", "append", 60))
    assert await store.write_record(sid, "alice", "big") is None
    assert await store.append(sid, "alice", [1] * 4, Once("big", "append", 60)) == 4
