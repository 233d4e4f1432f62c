"""LensServe end to end: real vLLM (tiny model, CPU), real redis-server, real grpc.aio server."""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from lens_serve.client import LensClient
from lens_serve.engine.vllm import VllmEngine
from lens_serve.v1 import lens_serve_pb2 as pb
from tests.integration.serving_fixtures import Stack, serving_stack

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.integration]

DOCUMENT = inspect.getsource(inspect)[:40_000]  # long real text the tiny tokenizer knows


@pytest_asyncio.fixture(loop_scope="session")
async def stack(
    vllm_engine: VllmEngine, tiny_model_dir: Path, redis_url: str
) -> AsyncIterator[Stack]:
    async with serving_stack(vllm_engine, tiny_model_dir, redis_url) as s:
        yield s
        await s.redis.flushdb()


async def _session_with_document(stack: Stack, chars: int = 20_000) -> str:
    session = await stack.stub.CreateSession(pb.CreateSessionRequest())

    async def chunks() -> AsyncIterator[pb.AppendRequest]:
        yield pb.AppendRequest(session_id=session.session_id, text=DOCUMENT[: chars // 2])
        yield pb.AppendRequest(text=DOCUMENT[chars // 2 : chars])

    await stack.stub.Append(chunks())
    return session.session_id


async def _generate(stack: Stack, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    return [r async for r in stack.stub.Generate(request)]


async def _lifetime(stack: Stack, session_id: str) -> int:
    return (
        await stack.stub.GetSession(pb.GetSessionRequest(session_id=session_id))
    ).lifetime_tokens


async def test_generate_streams_tokens_and_reports_usage_last(stack: Stack) -> None:
    request = pb.GenerateRequest(prompt="def main(argv):", sampling=pb.SamplingParams(max_tokens=6))
    chunks = await _generate(stack, request)
    assert len(chunks) >= 2 and not chunks[0].HasField("usage")
    last = chunks[-1]
    assert last.finish_reason in ("length", "stop") and last.HasField("usage")
    assert sum(len(c.token_ids) for c in chunks) == last.usage.completion_tokens > 0
    assert last.usage.lens_version == stack.service.weights.version
    assert last.usage.policy == pb.POLICY_LENS and last.usage.wc_rows == last.usage.lifetime_tokens
    assert len({c.request_id for c in chunks}) == 1


@pytest.mark.parametrize("policy", [pb.POLICY_LENS, pb.POLICY_RECENCY, pb.POLICY_UNIFORM,
                                    pb.POLICY_RANDOM, pb.POLICY_FULL])  # fmt: skip
async def test_each_policy_serves_a_long_session_within_budget(
    stack: Stack, policy: pb.Policy.ValueType
) -> None:
    session_id = await _session_with_document(stack, chars=6_000)
    lifetime = await _lifetime(stack, session_id)
    budget = 1024 if policy == pb.POLICY_FULL else 256
    assert lifetime > 256
    request = pb.GenerateRequest(
        session_id=session_id, prompt="\n# next:", wc_budget=budget, policy=policy,
        sampling=pb.SamplingParams(max_tokens=4),
    )  # fmt: skip
    if policy == pb.POLICY_FULL and lifetime + 10 > budget:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _generate(stack, request)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "wc_budget" in (raised.value.details() or "")
        return
    usage = (await _generate(stack, request))[-1].usage
    assert usage.policy == policy and 0 < usage.wc_rows <= budget
    assert (usage.gist_covered_tokens > 0) == (policy in (pb.POLICY_LENS, pb.POLICY_UNIFORM,
                                                          pb.POLICY_RANDOM))  # fmt: skip
    wc = await stack.stub.GetWorkingContext(
        pb.GetWorkingContextRequest(session_id=session_id, wc_budget=budget, policy=policy)
    )
    timeline = [span for span in wc.spans if not span.recalled]  # recalls are copies
    assert wc.rows <= budget and timeline[-1].end == wc.lifetime_tokens
    assert all(a.end == b.start for a, b in itertools.pairwise(timeline))


async def test_session_appends_prompt_and_completion(stack: Stack) -> None:
    session_id = await _session_with_document(stack, chars=2_000)
    before = await _lifetime(stack, session_id)
    chunks = await _generate(
        stack, pb.GenerateRequest(session_id=session_id, prompt_token_ids=[5, 6, 7],
                                  sampling=pb.SamplingParams(max_tokens=5))
    )  # fmt: skip
    assert await _lifetime(stack, session_id) == before + 3 + chunks[-1].usage.completion_tokens


async def test_the_next_turn_finds_the_previous_answer_in_the_prefix_cache(
    stack: Stack, vllm_engine: VllmEngine
) -> None:
    """vLLM cannot reuse the KV of decoded tokens for a prompt of embeddings; the server prefills
    WC + answer after each turn, so the next turn recomputes only its own new rows."""
    session_id = await _session_with_document(stack, chars=6_000)
    block = vllm_engine.block_size
    usages = []
    for prompt in ("\n# first:", "\n# second:", "\n# third:"):
        request = pb.GenerateRequest(
            session_id=session_id,
            prompt=prompt,
            sampling=pb.SamplingParams(max_tokens=40, temperature=0),
        )
        usages.append((await _generate(stack, request))[-1].usage)  # fmt: skip
        await stack.service.settle_prewarms()
    second, third = usages[1], usages[2]
    assert second.completion_tokens == 40 and third.wc_rows > second.wc_rows + 40
    # The answer's 40 rows are cached: more than the previous prompt's whole blocks alone.
    assert third.cached_rows == (second.wc_rows + 40) // block * block > second.wc_rows


async def test_score_gives_per_token_nll_and_policies_differ(stack: Stack) -> None:
    session_id = await _session_with_document(stack, chars=8_000)
    results = {}
    for policy in (pb.POLICY_RECENCY, pb.POLICY_LENS):
        results[policy] = await stack.stub.Score(
            pb.ScoreRequest(session_id=session_id, continuation="    return None\n", policy=policy)
        )
    for r in results.values():
        assert len(r.token_nll) == len(r.continuation_token_ids) > 0
        assert r.mean_nll == pytest.approx(sum(r.token_nll) / len(r.token_nll), rel=1e-5)
        assert r.mean_nll > 0
    assert results[pb.POLICY_LENS].working_context.policy == "lens"
    assert results[pb.POLICY_RECENCY].working_context.spans[0].start > 0


async def test_session_continues_across_a_server_restart(
    vllm_engine: VllmEngine, tiny_model_dir: Path, redis_url: str
) -> None:
    async with serving_stack(vllm_engine, tiny_model_dir, redis_url) as first:
        session_id = await _session_with_document(first, chars=4_000)
        await _generate(first, pb.GenerateRequest(session_id=session_id, prompt="x = 1"))
        lifetime = await _lifetime(first, session_id)
    async with serving_stack(vllm_engine, tiny_model_dir, redis_url) as second:  # fresh caches
        assert await _lifetime(second, session_id) == lifetime
        chunks = await _generate(second, pb.GenerateRequest(session_id=session_id, prompt="y"))
        assert chunks[-1].usage.lifetime_tokens == lifetime + 1
        await second.redis.flushdb()


async def _wait_engine_idle(engine: VllmEngine, limit_s: float = 10.0) -> None:
    for _ in range(int(limit_s / 0.05)):
        if engine.stats().unfinished_requests == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"engine still has {engine.stats().unfinished_requests} requests")


async def test_client_cancel_mid_stream_aborts_the_engine_request(
    stack: Stack, vllm_engine: VllmEngine
) -> None:
    call = stack.stub.Generate(
        pb.GenerateRequest(prompt="class A:", sampling=pb.SamplingParams(max_tokens=500))
    )
    received = 0
    async for _ in call:
        received += 1
        if received == 2:
            call.cancel()
            break
    await _wait_engine_idle(vllm_engine)


async def test_deadline_is_honoured_and_frees_the_engine(
    stack: Stack, vllm_engine: VllmEngine
) -> None:
    request = pb.GenerateRequest(prompt="import os", sampling=pb.SamplingParams(max_tokens=500))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in stack.stub.Generate(request, timeout=0.5):
            pass
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _wait_engine_idle(vllm_engine)


async def test_sixteen_concurrent_streams_all_finish(stack: Stack) -> None:
    requests = [
        pb.GenerateRequest(prompt=f"def f{i}(x):", sampling=pb.SamplingParams(max_tokens=8))
        for i in range(16)
    ]
    results = await asyncio.gather(*(_generate(stack, r) for r in requests))
    assert all(r[-1].usage.completion_tokens == 8 for r in results)


BAD_REQUESTS = [
    (pb.GenerateRequest(prompt=""), "prompt"),
    (pb.GenerateRequest(prompt="a", prompt_token_ids=[1]), "prompt"),
    (pb.GenerateRequest(prompt_token_ids=[1, 10**6]), "prompt_token_ids"),
    (pb.GenerateRequest(prompt="a", wc_budget=16), "wc_budget"),
    (pb.GenerateRequest(prompt="a", wc_budget=5000), "wc_budget"),
    (pb.GenerateRequest(prompt="a", policy=99), "policy"),  # type: ignore[arg-type]
    (pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(max_tokens=5000)), "max_tokens"),
    (pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(top_p=2)), "top_p"),
    (pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(temperature=-1)), "temperature"),
]


@pytest.mark.parametrize(("request_", "field"), BAD_REQUESTS)
async def test_bad_input_is_invalid_argument_naming_the_field_and_keeps_the_session(
    stack: Stack, request_: pb.GenerateRequest, field: str
) -> None:
    session_id = await _session_with_document(stack, chars=1_000)
    before = await _lifetime(stack, session_id)
    request_.session_id = session_id
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _generate(stack, request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (raised.value.details() or "")
    assert await _lifetime(stack, session_id) == before


async def test_unknown_session_is_not_found(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _generate(stack, pb.GenerateRequest(session_id="0" * 32, prompt="a"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "session_id" in (raised.value.details() or "")


async def test_invalid_utf8_is_invalid_argument(stack: Stack) -> None:
    raw = stack.channel.unary_stream(
        "/lens_serve.v1.LensServe/Generate",
        request_serializer=lambda b: b,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    bad_prompt = b"\x12\x02\xff\xfe"  # field 2 (prompt), 2 bytes that are not UTF-8
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in raw(bad_prompt):
            pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request" in (raised.value.details() or "")


async def test_oversize_message_is_refused(
    vllm_engine: VllmEngine, tiny_model_dir: Path, redis_url: str
) -> None:
    async with serving_stack(vllm_engine, tiny_model_dir, redis_url, max_message_bytes=4096) as s:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _generate(s, pb.GenerateRequest(prompt="z" * 10_000))
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_auth_rejects_missing_token_and_hides_other_owners_sessions(
    vllm_engine: VllmEngine, tiny_model_dir: Path, redis_url: str
) -> None:
    async with serving_stack(vllm_engine, tiny_model_dir, redis_url, api_tokens="alice,bob") as s:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await s.stub.CreateSession(pb.CreateSessionRequest())
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with (
            LensClient(s.target, token="alice") as alice,
            LensClient(s.target, token="bob") as bob,
        ):
            session = await alice.create_session()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await bob.get_session(session.session_id)
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
            assert (await alice.get_session(session.session_id)).session_id == session.session_id
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await s.admin.GetLensStatus(pb.GetLensStatusRequest())
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await s.redis.flushdb()


async def test_redis_session_state_is_in_redis(stack: Stack) -> None:
    session_id = await _session_with_document(stack, chars=500)
    keys = await stack.redis.keys(f"lens:session:{session_id}*")
    assert len(keys) == 2 and await stack.redis.ttl(keys[0]) > 0
    assert isinstance(stack.redis, Redis)


async def test_the_working_context_follows_the_query_and_says_which(stack: Stack) -> None:
    """A rare token planted deep in a session: `retrieval` and `lens` show its block raw when the
    query asks for it, and every response names the query its working context was chosen for."""
    tokens = [(7 * i) % 3000 + 100 for i in range(6000)]  # a long session of common ids
    planted, rare = 1234, 4000  # id 4000 occurs nowhere else
    tokens[planted] = rare
    session = await stack.stub.CreateSession(pb.CreateSessionRequest())
    await stack.stub.Append(
        iter([pb.AppendRequest(session_id=session.session_id, token_ids=tokens)])
    )
    for policy in (pb.POLICY_RETRIEVAL, pb.POLICY_LENS):
        wc = await stack.stub.GetWorkingContext(
            pb.GetWorkingContextRequest(
                session_id=session.session_id, wc_budget=512, policy=policy,
                query_token_ids=[rare],
            )
        )  # fmt: skip
        assert wc.query_source == "query" and wc.query_tokens == 1
        (at,) = [s for s in wc.spans if s.start <= planted < s.end]
        assert at.lod == 0, (pb.Policy.Name(policy), at)
        newest = await stack.stub.GetWorkingContext(
            pb.GetWorkingContextRequest(session_id=session.session_id, wc_budget=512, policy=policy)
        )
        assert newest.query_source == "newest"
        (far,) = [s for s in newest.spans if s.start <= planted < s.end]
        assert far.lod > 0  # the newest tokens do not ask for it
    score = await stack.stub.Score(
        pb.ScoreRequest(session_id=session.session_id, continuation_token_ids=[5, 6],
                        policy=pb.POLICY_RETRIEVAL, wc_budget=512, query_token_ids=[rare])
    )  # fmt: skip
    assert score.working_context.query_source == "query"
    chunks = await _generate(
        stack,
        pb.GenerateRequest(session_id=session.session_id, prompt_token_ids=[rare, 7, 8],
                           wc_budget=512, sampling=pb.SamplingParams(max_tokens=2)),
    )  # fmt: skip
    usage = chunks[-1].usage
    assert (usage.query_source, usage.query_tokens) == ("prompt", 3)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.stub.GetWorkingContext(
            pb.GetWorkingContextRequest(session_id=session.session_id, query="x",
                                        query_token_ids=[1])
        )  # fmt: skip
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "query" in (refused.value.details() or "")
