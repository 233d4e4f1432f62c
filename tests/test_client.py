"""LensClient / SyncLensClient against the fake servicers: policy names, auth metadata, chunked
Append, streaming Generate (the real server is covered by the integration tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from lens_serve.client import LensClient, SyncLensClient, Unauthenticated
from lens_serve.service import auth
from lens_serve.v1 import lens_serve_pb2 as pb
from tests.fake_servicers import FakeServer, make_settings, running_fake_server

TOKEN = "client-token"
ADMIN_TOKEN = "client-admin-token"


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    settings = make_settings(api_tokens=TOKEN, admin_token=ADMIN_TOKEN)
    async with running_fake_server(settings) as server:
        yield server


@pytest.fixture
async def client(fake: FakeServer) -> AsyncIterator[LensClient]:
    async with LensClient(fake.target, token=TOKEN, admin_token=ADMIN_TOKEN) as c:
        yield c


async def test_client_sends_bearer_token(client: LensClient) -> None:
    session = await client.create_session()
    assert session.session_id == auth.owner_for_token(TOKEN)
    wc = await client.working_context("s", wc_budget=64, policy="recency")
    assert wc.lens_version == f"Bearer {TOKEN}"  # the fake echoes the authorization metadata
    assert wc.policy == "POLICY_RECENCY"
    assert wc.budget == 64


async def test_client_admin_calls_use_admin_token(client: LensClient) -> None:
    status = await client.lens_status()
    assert status.current_version == auth.ADMIN
    reply = await client.set_lens_version("v7")
    assert reply.current_version == "v7"


async def test_client_without_token_unauthenticated(fake: FakeServer) -> None:
    async with LensClient(fake.target) as anonymous:
        with pytest.raises(Unauthenticated) as caught:
            await anonymous.create_session()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_client_generate_streams_and_maps_request(
    fake: FakeServer, client: LensClient
) -> None:
    chunks = [
        c
        async for c in client.generate(
            "hi",
            session_id="s1",
            max_tokens=5,
            temperature=0.5,
            top_p=0.9,
            seed=3,
            stop=["\n"],
            wc_budget=128,
            policy="uniform",
            chat=True,
        )
    ]
    assert [c.text for c in chunks[:3]] == ["t0", "t1", "t2"]
    assert chunks[-1].finish_reason == "stop"
    request = fake.servicer.observed.generate_requests[-1]
    assert request.prompt == "hi"
    assert request.session_id == "s1"
    assert request.policy == pb.POLICY_UNIFORM
    assert request.wc_budget == 128
    assert request.chat
    assert request.sampling.max_tokens == 5
    assert request.sampling.seed == 3
    assert list(request.sampling.stop) == ["\n"]
    assert request.sampling.temperature == pytest.approx(0.5)


async def test_client_generate_token_ids_prompt(fake: FakeServer, client: LensClient) -> None:
    _ = [c async for c in client.generate([5, 6, 7])]
    request = fake.servicer.observed.generate_requests[-1]
    assert list(request.prompt_token_ids) == [5, 6, 7]
    assert request.prompt == ""


async def test_client_generate_unknown_policy_raises_at_call(client: LensClient) -> None:
    with pytest.raises(ValueError, match="policy"):
        client.generate("hi", policy="best")


async def test_client_generate_aclose_cancels_rpc(fake: FakeServer, client: LensClient) -> None:
    stream = client.generate("slow")  # the fake then waits 60 s after its first chunk
    first = await anext(stream)
    assert first.text == "t0"
    await stream.aclose()
    await asyncio.wait_for(fake.servicer.observed.cancelled.wait(), timeout=5)


async def test_client_append_chunks_text_with_session_on_first(
    fake: FakeServer, client: LensClient
) -> None:
    reply = await client.append("sess", text="abcdefghij", chunk_chars=4)
    chunks = fake.servicer.observed.append_chunks
    assert [c.text for c in chunks] == ["abcd", "efgh", "ij"]
    assert [c.session_id for c in chunks] == ["sess", "", ""]
    assert reply.appended_tokens == 10


async def test_client_append_chunks_token_ids(fake: FakeServer, client: LensClient) -> None:
    await client.append("sess", token_ids=list(range(5)), chunk_tokens=2)
    chunks = fake.servicer.observed.append_chunks
    assert [list(c.token_ids) for c in chunks] == [[0, 1], [2, 3], [4]]


async def test_client_append_needs_exactly_one_payload(client: LensClient) -> None:
    with pytest.raises(ValueError, match="exactly one of text or token_ids"):
        await client.append("sess")
    with pytest.raises(ValueError, match="exactly one of text or token_ids"):
        await client.append("sess", text="a", token_ids=[1])


async def test_client_score_maps_text_and_ids(fake: FakeServer, client: LensClient) -> None:
    reply = await client.score(" world", context="hello", policy="full", wc_budget=32)
    assert reply.mean_nll == pytest.approx(1.5)
    request = fake.servicer.observed.score_requests[-1]
    assert (request.context, request.continuation) == ("hello", " world")
    assert request.policy == pb.POLICY_FULL
    await client.score([1, 2], context=[3, 4], session_id="s")
    request = fake.servicer.observed.score_requests[-1]
    assert list(request.continuation_token_ids) == [1, 2]
    assert list(request.context_token_ids) == [3, 4]
    assert request.session_id == "s"


async def test_sync_client_same_methods(fake: FakeServer) -> None:
    # The sync client blocks, and the server runs on this event loop: call it from a thread.
    def run() -> tuple[str, list[str], int, str]:
        with SyncLensClient(fake.target, token=TOKEN, admin_token=ADMIN_TOKEN) as sync:
            owner = sync.create_session().session_id
            texts = [c.text for c in sync.generate("hi", policy="recency")]
            appended = sync.append("s", text="abc", chunk_chars=1).appended_tokens
            admin = sync.lens_status().current_version
            return owner, texts, appended, admin

    owner, texts, appended, admin = await asyncio.to_thread(run)
    assert owner == auth.owner_for_token(TOKEN)
    assert texts[:3] == ["t0", "t1", "t2"]
    assert fake.servicer.observed.generate_requests[-1].policy == pb.POLICY_RECENCY
    assert appended == 3
    assert admin == auth.ADMIN


def test_sync_client_unknown_policy_raises_before_any_rpc() -> None:
    with SyncLensClient("127.0.0.1:1") as sync, pytest.raises(ValueError, match="policy"):
        sync.generate("hi", policy="nope")


def test_client_names_match_between_async_and_sync() -> None:
    public = {n for n in dir(LensClient) if not n.startswith("_")}
    assert public == {n for n in dir(SyncLensClient) if not n.startswith("_")}
