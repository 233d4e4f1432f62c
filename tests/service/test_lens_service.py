"""LensService with a FakeEngine and a real redis-server: validation, sessions, limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError

from lens_serve.core.allocator import FocusConfig
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.gistnet import GistNetConfig, build_gistnet
from lens_serve.core.tree import LifetimeTree
from lens_serve.errors import InvalidRequest, LensError, Overloaded
from lens_serve.service.composition import assemble_service, build_service
from lens_serve.service.config import Settings
from lens_serve.service.hot_swap import WeightStore
from lens_serve.service.lens_service import LensService
from lens_serve.service.requests import GenerateEvent, GenerateInput, Sampling, ScoreInput
from lens_serve.service.tree_cache import CachedSession
from lens_serve.store.registry import GISTNET
from lens_serve.store.sessions import Once, SessionFull, SessionNotFound
from tests.core_helpers import HIDDEN, random_table
from tests.fakes import FakeEngine
from tests.fixtures_redis import RedisServerFactory

OWNER = "tok:test"


def make_service(redis: Redis, **overrides: object) -> LensService:
    fields: dict[str, object] = dict(
        model="fake", wc_budget=64, max_wc_budget=256, tail=8, block_size=4,
        max_session_tokens=5000, max_tokens=4, max_model_len=512, session_ttl_s=3600,
    )  # fmt: skip
    fields.update(overrides)
    settings = Settings(**fields)  # type: ignore[arg-type]
    table = random_table()
    engine = FakeEngine(table, max_model_len=settings.max_model_len)
    gistnet = build_gistnet(GistNetConfig(block_size=4, hidden_size=HIDDEN))
    weights = WeightStore(redis, HIDDEN, seed=0, focus=FocusConfig())
    return assemble_service(settings, engine, redis, table=table, gistnet=gistnet, weights=weights)


@pytest_asyncio.fixture
async def service(redis_client: Redis) -> LensService:
    return make_service(redis_client)


async def collect(stream: AsyncIterator[GenerateEvent]) -> list[GenerateEvent]:
    return [event async for event in stream]


async def test_generate_without_session_streams_and_reports_usage(service: LensService) -> None:
    events = await collect(service.generate(OWNER, GenerateInput(prompt="x" * 300)))
    assert [e.token_ids for e in events] == [[7]] * 4
    usage = events[-1].usage
    assert usage is not None and events[-1].finish_reason == "length"
    assert usage.lifetime_tokens == 300 and usage.wc_rows <= 64 and usage.completion_tokens == 4
    assert usage.lens_version == service.weights.version and usage.policy == "lens"
    assert usage.gist_covered_tokens > 0


async def test_generate_with_session_appends_prompt_and_completion(service: LensService) -> None:
    session = await service.create_session(OWNER)
    await service.append(OWNER, session.session_id, ["hello world " * 20])
    await collect(service.generate(OWNER, GenerateInput(session.session_id, prompt="hi")))
    info, _ = await service.get_session(OWNER, session.session_id)
    assert info.lifetime_tokens == 240 + 2 + 4
    tokens = await service.sessions.tokens(session.session_id, OWNER)
    assert tokens[-6:].tolist() == [3 + ord("h"), 3 + ord("i"), 7, 7, 7, 7]


async def test_a_session_turn_prewarms_the_next_turns_prefix(redis_client: Redis) -> None:
    service = make_service(redis_client, wc_budget=128)
    engine = service.engine
    assert isinstance(engine, FakeEngine)
    session = await service.create_session(OWNER)
    await service.append(OWNER, session.session_id, ["hello world " * 20])
    turns, prewarms = [], []
    for prompt in ("first", "second", "third", "fourth"):
        await collect(service.generate(OWNER, GenerateInput(session.session_id, prompt=prompt)))
        await service.settle_prewarms()  # the prewarm runs in the background
        turns.append(engine.prompts[-2])
        prewarms.append(engine.prompts[-1])
    # Every turn starts with the rows prefilled after the previous one: nothing it reuses is
    # recomputed, not even when the WC had to be refit to make room (that happened in the prewarm).
    for prewarm, turn in zip(prewarms, turns[1:], strict=False):
        assert torch.equal(turn[: prewarm.shape[0]], prewarm)
    answer_rows = random_table()(torch.tensor([7] * 4))  # the fake answers 4 x token 7
    plain = [
        torch.equal(prewarm, torch.cat([turn, answer_rows]))
        for turn, prewarm in zip(turns, prewarms, strict=True)
    ]
    assert False in plain and True in plain  # a refit ahead of a turn, and plain appends


async def test_prewarm_can_be_switched_off(redis_client: Redis) -> None:
    service = make_service(redis_client, prewarm_next_turn=False)
    session = await service.create_session(OWNER)
    await collect(service.generate(OWNER, GenerateInput(session.session_id, prompt="hi")))
    await service.settle_prewarms()
    assert len(service.engine.prompts) == 1  # type: ignore[attr-defined]


BAD_INPUTS = [
    (GenerateInput(prompt=""), "prompt"),
    (GenerateInput(prompt="a", prompt_token_ids=(1,)), "prompt"),
    (GenerateInput(prompt_token_ids=(1, 100_000)), "prompt_token_ids"),
    (GenerateInput(prompt_token_ids=(-1,)), "prompt_token_ids"),
    (GenerateInput(prompt_token_ids=(5,), chat=True), "chat"),
    (
        GenerateInput(prompt="a", sampling=Sampling(temperature=float("nan"))),
        "sampling.temperature",
    ),
    (GenerateInput(prompt="a", sampling=Sampling(temperature=-1)), "sampling.temperature"),
    (GenerateInput(prompt="a", sampling=Sampling(top_p=1.5)), "sampling.top_p"),
    (GenerateInput(prompt="a", sampling=Sampling(max_tokens=10_000)), "sampling.max_tokens"),
    (GenerateInput(prompt="a", sampling=Sampling(stop=("",))), "sampling.stop"),
    (GenerateInput(prompt="a", wc_budget=8), "wc_budget"),
    (GenerateInput(prompt="a", wc_budget=100_000), "wc_budget"),
    (GenerateInput(prompt="a", policy="smart"), "policy"),
    (GenerateInput(prompt="y" * 300, wc_budget=200, policy="full"), "wc_budget"),
    (GenerateInput(prompt="y" * 4000, wc_budget=12), "wc_budget"),
]


@pytest.mark.parametrize(("request_", "field"), BAD_INPUTS)
async def test_bad_generate_input_names_the_field_and_leaves_the_session_intact(
    service: LensService, request_: GenerateInput, field: str
) -> None:
    session = await service.create_session(OWNER)
    await service.append(OWNER, session.session_id, ["some history " * 10])
    before = (await service.sessions.tokens(session.session_id, OWNER)).tolist()
    bad = GenerateInput(
        session.session_id, request_.prompt, request_.prompt_token_ids, request_.sampling,
        request_.wc_budget, request_.policy, request_.chat,
    )  # fmt: skip
    with pytest.raises(InvalidRequest) as raised:
        await collect(service.generate(OWNER, bad))
    assert raised.value.field == field
    assert (await service.sessions.tokens(session.session_id, OWNER)).tolist() == before


async def test_unknown_or_foreign_session_is_not_found(service: LensService) -> None:
    session = await service.create_session(OWNER)
    for owner, sid in (("tok:other", session.session_id), (OWNER, "0" * 32)):
        with pytest.raises(SessionNotFound):
            await collect(service.generate(owner, GenerateInput(sid, prompt="a")))
        with pytest.raises(SessionNotFound):
            await service.working_context(owner, sid, 0, "")


async def test_session_limit_is_checked_before_anything_is_written(redis_client: Redis) -> None:
    service = make_service(redis_client, max_session_tokens=100)
    session = await service.create_session(OWNER)
    await service.append(OWNER, session.session_id, ["z" * 95])
    with pytest.raises(SessionFull):
        await collect(service.generate(OWNER, GenerateInput(session.session_id, prompt="ab")))
    info, _ = await service.get_session(OWNER, session.session_id)
    assert info.lifetime_tokens == 95


async def test_requests_over_the_concurrency_limit_are_refused(redis_client: Redis) -> None:
    service = make_service(redis_client, max_concurrency=2)
    engine = service.engine
    assert isinstance(engine, FakeEngine)
    engine.gate = asyncio.Event()
    streams = [service.generate(OWNER, GenerateInput(prompt="q")) for _ in range(2)]

    async def first(stream: AsyncGenerator[GenerateEvent, None]) -> GenerateEvent:
        return await anext(stream)

    held = [asyncio.create_task(first(s)) for s in streams]
    await asyncio.sleep(0.05)
    with pytest.raises(Overloaded):
        await collect(service.generate(OWNER, GenerateInput(prompt="q")))
    engine.gate.set()
    for task, stream in zip(held, streams, strict=True):
        await task
        await stream.aclose()


async def test_score_returns_per_token_nll_and_the_working_context(service: LensService) -> None:
    result = await service.score(
        OWNER, ScoreInput(context="c" * 500, continuation="next", wc_budget=100, policy="uniform")
    )
    assert result.token_nll == [0.5] * 4 and result.mean_nll == 0.5
    assert result.view.working_context.policy == "uniform"
    assert result.view.working_context.rows <= 100


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (ScoreInput(context="c", continuation=""), "continuation"),
        (ScoreInput(context="", continuation="x"), "context"),
        (ScoreInput(context="c", context_token_ids=(1,), continuation="x"), "context"),
        (ScoreInput(context="c", continuation="x" * 600), "continuation"),
    ],
)
async def test_bad_score_input_names_the_field(
    service: LensService, request_: ScoreInput, field: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        await service.score(OWNER, request_)
    assert raised.value.field == field


async def test_lens_working_context_of_a_session_is_stable_across_turns(
    service: LensService,
) -> None:
    session = await service.create_session(OWNER)
    await service.append(OWNER, session.session_id, ["a long document " * 40])
    first = await service.working_context(OWNER, session.session_id, 128, "lens")
    again = await service.working_context(OWNER, session.session_id, 128, "lens")
    assert first.working_context.signature() == again.working_context.signature()
    assert first.working_context.start == 0 and first.working_context.rows <= 128


async def test_errors_carry_grpc_status_names(service: LensService) -> None:
    with pytest.raises(LensError) as raised:
        await service.get_session(OWNER, "f" * 32)
    assert raised.value.status == "NOT_FOUND"


async def test_create_picks_up_the_published_gistnet(
    redis_client: Redis, tiny_model_dir: Path
) -> None:
    table = EmbeddingTable.from_checkpoint(tiny_model_dir)
    fields: dict[str, object] = dict(model=str(tiny_model_dir), block_size=4, gist_rows=1, tail=8)
    settings = Settings(**fields)  # type: ignore[arg-type]
    trained = build_gistnet(
        GistNetConfig("transformer", block_size=4, hidden_size=table.hidden_size, seed=5)
    )
    mismatched = build_gistnet(
        GistNetConfig("transformer", block_size=4, rows=2, hidden_size=table.hidden_size)
    )
    engine = FakeEngine(table)
    await GISTNET.publish(redis_client, mismatched)  # rows differ: rejected, configured kept
    service = await build_service(settings, engine, redis_client)
    await service.aclose()
    assert service.gistnet_version.startswith("gist-tokens-")
    await GISTNET.publish(redis_client, trained)
    service = await build_service(settings, engine, redis_client)
    try:
        assert service.gistnet_version == trained.version
        score = await service.score(OWNER, ScoreInput(context="x" * 200, continuation="yz"))
        assert score.view.gistnet_version == trained.version
    finally:
        await service.aclose()


async def test_a_tree_built_with_another_gistnet_is_rebuilt(service: LensService) -> None:
    session = await service.create_session(OWNER)
    await service.append(OWNER, session.session_id, ["hello world " * 20])
    other = build_gistnet(GistNetConfig("mean", block_size=4, hidden_size=HIDDEN))
    tokens = await service.sessions.tokens(session.session_id, OWNER)
    stale = LifetimeTree(other, random_table())
    stale.append(tokens)
    service._trees.put(session.session_id, CachedSession(stale))
    events = await collect(service.generate(OWNER, GenerateInput(session.session_id, prompt="hi")))
    usage = events[-1].usage
    assert usage is not None and usage.gistnet_version == service.gistnet_version


async def test_a_log_that_lost_acknowledged_writes_replaces_the_cached_tree(
    redis_server_factory: RedisServerFactory,
) -> None:
    """Redis comes back from an older snapshot (a crash under appendfsync everysec, a failover to
    a lagging replica): the server answers from the log it finds, never from its cached tree."""
    server = redis_server_factory(appendonly=False)
    # Reconnects after the restart (a connection error is retried once, as a server's client is).
    redis = Redis.from_url(
        server.url, retry=Retry(NoBackoff(), 1), retry_on_error=[ConnectionError]
    )
    try:
        service = make_service(redis)
        sid = (await service.create_session(OWNER)).session_id
        await service.append(OWNER, sid, ["a" * 640])
        await redis.save()  # what the restart will come back to
        await service.append(OWNER, sid, ["b" * 320])
        cached = await service.working_context(OWNER, sid, 64, "lens")
        assert cached.working_context.lifetime == 960
        server.restart(hard=True)  # SIGKILL: the last 320 tokens were acknowledged, never saved
        await service.append(OWNER, sid, ["c" * 8])
        view = await service.working_context(OWNER, sid, 64, "lens")
        assert view.working_context.lifetime == 648
        tokens = await service.sessions.tokens(sid, OWNER)
        assert service._trees.get(sid).tree.tokens().tolist() == tokens.tolist()  # type: ignore[union-attr]
    finally:
        await redis.aclose()


async def test_a_retried_turn_with_an_idempotency_key_is_replayed_not_repeated(
    service: LensService,
) -> None:
    sid = (await service.create_session(OWNER)).session_id
    await service.append(OWNER, sid, ["hello world " * 20])
    turn = GenerateInput(sid, prompt="hi", idempotency_key="turn-1")
    first = await collect(service.generate(OWNER, turn))
    lifetime = (await service.get_session(OWNER, sid))[0].lifetime_tokens
    assert lifetime == 240 + 2 + 4
    # The reply was lost; the client retries: the stored answer comes back, nothing is written.
    retry = await collect(service.generate(OWNER, turn))
    assert len(retry) == 1 and retry[0].usage is not None and retry[0].usage.replayed
    assert retry[0].token_ids == [t for e in first for t in e.token_ids]
    assert retry[0].finish_reason == first[-1].finish_reason == "length"
    assert (await service.get_session(OWNER, sid))[0].lifetime_tokens == lifetime


async def test_a_retry_after_the_prompt_was_stored_appends_only_the_answer(
    service: LensService,
) -> None:
    """Redis went away after the prompt's write and before the answer's: the retry generates
    (the turn has no answer) without storing the prompt a second time."""
    sid = (await service.create_session(OWNER)).session_id
    await service.append(OWNER, sid, ["hello world " * 20])
    prompt = service._validate.prompt_ids(GenerateInput(sid, prompt="hi"))
    await service.sessions.append(sid, OWNER, prompt, Once("turn-2", "prompt", 60))
    retry = await collect(
        service.generate(OWNER, GenerateInput(sid, "hi", idempotency_key="turn-2"))
    )
    assert retry[-1].usage is not None and not retry[-1].usage.replayed
    tokens = (await service.sessions.tokens(sid, OWNER)).tolist()
    assert len(tokens) == 240 + 2 + 4 and tokens[240:242] == prompt


@pytest.mark.parametrize("key", ["x" * 129, "has space", "ünïcode"])
async def test_a_bad_idempotency_key_names_the_field(service: LensService, key: str) -> None:
    sid = (await service.create_session(OWNER)).session_id
    with pytest.raises(InvalidRequest, match="idempotency_key"):
        await collect(service.generate(OWNER, GenerateInput(sid, "hi", idempotency_key=key)))


async def test_an_append_applied_during_a_redis_stall_is_not_duplicated_by_its_retry(
    redis_server_factory: RedisServerFactory,
) -> None:
    """The client sees a timeout (UNAVAILABLE) while Redis is stalled; Redis applies the write
    when it resumes; the client retries with the same idempotency key: appended once."""
    server = redis_server_factory(appendonly=False)
    redis = Redis.from_url(server.url, socket_timeout=0.5)
    try:
        service = make_service(redis)
        sid = (await service.create_session(OWNER)).session_id
        await service.append(OWNER, sid, ["a"])  # Redis has the append script from now on
        once = Once("upload-1", "append", 60)
        with server.stalled(), pytest.raises(RedisError):
            await service.sessions.append(sid, OWNER, [5] * 100, once)
        await asyncio.sleep(0.2)  # the stalled write runs once Redis resumes
        assert (await service.get_session(OWNER, sid))[0].lifetime_tokens == 101
        retry = await service.append(OWNER, sid, [[5] * 100], idempotency_key="upload-1")
        assert retry == (101, 100)
        assert await service.append(OWNER, sid, ["y" * 5], idempotency_key="upload-2") == (106, 5)
    finally:
        await redis.aclose()
