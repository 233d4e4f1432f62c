"""Generate's chat messages and sampling options over gRPC (the production server and servicer, the
domain service on a FakeEngine, a real redis-server), through the stub and the Python client."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from lens_serve.client import LensClient
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.v1 import lens_serve_pb2 as pb
from tests.fakes import FAKE_LOGPROB, FakeEngine
from tests.service.test_servicer_faults import Served, new_session, serving

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "the first question"},
    {"role": "assistant", "content": "an answer"},
    {"role": "user", "content": "what?"},
]


def chat_request(messages: Sequence[Mapping[str, str]], **fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        **fields,
    )


async def generate(served: Served, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    return [response async for response in served.stub.Generate(request)]


async def generate_error(served: Served, request: pb.GenerateRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(served, request)
    return caught.value


async def test_session_chat_is_rendered_and_chosen_for_the_last_user_message(
    redis_client: Redis,
) -> None:
    async with serving(redis_client) as served:
        session_id = await new_session(served)
        append = pb.AppendRequest(session_id=session_id, text="hello world " * 20)
        await served.stub.Append(iter([append]))
        request = chat_request(
            CHAT, session_id=session_id, sampling=pb.SamplingParams(max_tokens=2)
        )
        *_, last = await generate(served, request)
        rendered = served.engine.apply_chat_template(CHAT)
        usage = last.usage
        assert usage.prompt_tokens == len(rendered) and usage.lifetime_tokens == 240 + len(rendered)
        assert (usage.query_source, usage.query_tokens) == ("prompt", len("what?"))
        session = await served.stub.GetSession(pb.GetSessionRequest(session_id=session_id))
        assert session.lifetime_tokens == 240 + len(rendered) + 2


async def test_chat_without_a_session_is_the_whole_prompt(redis_client: Redis) -> None:
    async with serving(redis_client) as served:
        *_, last = await generate(served, chat_request(CHAT))
        assert last.usage.prompt_tokens == len(served.engine.apply_chat_template(CHAT))
        assert last.usage.query_source == "newest"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (chat_request(CHAT, prompt="and a prompt"), "messages"),
        (chat_request(CHAT, prompt_token_ids=[5]), "messages"),
        (chat_request([{"role": "tool", "content": "42"}]), "messages[0].role"),
        (chat_request([*CHAT, {"role": "", "content": "x"}]), "messages[4].role"),
    ],
)
async def test_bad_messages_are_refused_naming_the_field(
    redis_client: Redis, request_: pb.GenerateRequest, field: str
) -> None:
    async with serving(redis_client) as served:
        error = await generate_error(served, request_)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (error.details() or "").startswith(f"{field}:"), error.details()


class AlternatingTemplateEngine(FakeEngine):
    """A model whose chat template raises, as many do, unless user and assistant alternate."""

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        roles = [m["role"] for m in messages]
        if any(a == b for a, b in itertools.pairwise(roles)):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant")
        return super().apply_chat_template(messages)


async def test_chat_template_refusing_the_messages_is_invalid_argument(
    redis_client: Redis,
) -> None:
    def make_engine(table: EmbeddingTable, max_model_len: int) -> FakeEngine:
        return AlternatingTemplateEngine(table, max_model_len)

    async with serving(redis_client, make_engine) as served:
        twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        error = await generate_error(served, chat_request(twice))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "roles must alternate" in (error.details() or "")
        assert served.engine.prompts == []


async def test_sampling_options_reach_the_engine(redis_client: Redis) -> None:
    async with serving(redis_client) as served:
        sampling = pb.SamplingParams(
            max_tokens=2, top_k=5, presence_penalty=0.5, frequency_penalty=-1.5,
            repetition_penalty=1.25,
        )  # fmt: skip
        await generate(served, pb.GenerateRequest(prompt="hi", sampling=sampling))
        params = served.engine.params[-1]
        assert (params.top_k, params.presence_penalty, params.frequency_penalty) == (5, 0.5, -1.5)
        assert (params.repetition_penalty, params.logprobs) == (1.25, None)
        await generate(served, pb.GenerateRequest(prompt="hi"))  # zeros: no penalties
        params = served.engine.params[-1]
        assert (params.top_k, params.presence_penalty, params.repetition_penalty) == (0, 0.0, 1.0)


async def test_logprobs_come_with_every_token_when_asked(redis_client: Redis) -> None:
    async with serving(redis_client) as served:
        for top in (0, 2):
            sampling = pb.SamplingParams(max_tokens=3, logprobs=top)
            responses = await generate(served, pb.GenerateRequest(prompt="hi", sampling=sampling))
            for response in responses:
                assert len(response.logprobs) == len(response.token_ids) == 1
                [position] = response.logprobs
                assert (position.token.token_id, position.token.logprob) == (7, FAKE_LOGPROB)
                assert [t.token_id for t in position.top_logprobs] == [7, 8][:top]
        responses = await generate(served, pb.GenerateRequest(prompt="hi"))
        assert all(not response.logprobs for response in responses)


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        (pb.SamplingParams(presence_penalty=2.5), "sampling.presence_penalty"),
        (pb.SamplingParams(frequency_penalty=-3), "sampling.frequency_penalty"),
        (pb.SamplingParams(frequency_penalty=float("nan")), "sampling.frequency_penalty"),
        (pb.SamplingParams(repetition_penalty=2.5), "sampling.repetition_penalty"),
        (pb.SamplingParams(repetition_penalty=-1), "sampling.repetition_penalty"),
        (pb.SamplingParams(logprobs=21), "sampling.logprobs"),
    ],
)
async def test_bad_sampling_values_are_refused_naming_the_field(
    redis_client: Redis, sampling: pb.SamplingParams, field: str
) -> None:
    async with serving(redis_client) as served:
        error = await generate_error(served, pb.GenerateRequest(prompt="hi", sampling=sampling))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (error.details() or "").startswith(f"{field}:"), error.details()
        assert served.engine.prompts == []


async def test_client_sends_messages_and_sampling_options(redis_client: Redis) -> None:
    async with serving(redis_client) as served, LensClient(served.target) as client:
        chunks = [
            chunk
            async for chunk in client.generate(
                messages=CHAT, max_tokens=2, top_k=3, repetition_penalty=1.1, logprobs=1
            )
        ]
        assert chunks[-1].usage.prompt_tokens == len(served.engine.apply_chat_template(CHAT))
        assert all(len(chunk.logprobs[0].top_logprobs) == 1 for chunk in chunks)
        params = served.engine.params[-1]
        assert (params.top_k, params.logprobs) == (3, 1)
        assert params.repetition_penalty == pytest.approx(1.1)
