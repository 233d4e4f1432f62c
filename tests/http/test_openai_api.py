"""The OpenAI-compatible endpoint through the official `openai` client: a real uvicorn on a free
port, the real app and domain service on a FakeEngine and a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from lens_serve.core.allocator import FocusConfig
from lens_serve.core.gistnet import GistNetConfig, build_gistnet
from lens_serve.http.server import HttpServer
from lens_serve.service.composition import assemble_service
from lens_serve.service.config import Settings
from lens_serve.service.hot_swap import WeightStore
from lens_serve.service.lens_service import LensService
from tests.core_helpers import HIDDEN, random_table
from tests.fakes import FAKE_LOGPROB, FakeEngine

TOKEN, OTHER_TOKEN = "token-a", "token-b"
MODEL = "fake"
BASE_SETTINGS: dict[str, Any] = dict(
    model=MODEL, host="127.0.0.1", http_port=0, wc_budget=64, max_wc_budget=256, tail=8,
    block_size=4, max_session_tokens=5000, max_tokens=4, max_model_len=8192, session_ttl_s=3600,
    api_tokens=f"{TOKEN},{OTHER_TOKEN}",
)  # fmt: skip
CHAT_MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is it?"},
]
CHAT = cast(list[ChatCompletionMessageParam], CHAT_MESSAGES)
FAKE_TEXT = "\x04"  # the fake engine's token 7


@dataclass
class Served:
    base_url: str
    engine: FakeEngine
    service: LensService
    http: HttpServer

    def client(self, token: str = TOKEN) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=token, max_retries=0)


@asynccontextmanager
async def serving(redis: Redis, **overrides: Any) -> AsyncIterator[Served]:
    settings = Settings(**{**BASE_SETTINGS, **overrides})
    table = random_table()
    engine = FakeEngine(table, settings.max_model_len)
    gistnet = build_gistnet(GistNetConfig(block_size=settings.block_size, hidden_size=HIDDEN))
    weights = WeightStore(redis, HIDDEN, seed=0, focus=FocusConfig())
    service = assemble_service(
        settings, engine, redis, table=table, gistnet=gistnet, weights=weights
    )
    http = await HttpServer.start(service)
    try:
        yield Served(f"http://{http.address}/v1", engine, service, http)
    finally:
        await http.stop()
        await service.aclose()


@pytest.fixture
async def served(redis_client: Redis) -> AsyncIterator[Served]:
    async with serving(redis_client) as served:
        yield served


@pytest.fixture
async def client(served: Served) -> AsyncIterator[openai.AsyncOpenAI]:
    async with served.client() as client:
        yield client


async def new_session(client: openai.AsyncOpenAI, text: str = "") -> str:
    session: Any = await client.post("/lens/sessions", cast_to=object)
    if text:
        await client.post(
            f"/lens/sessions/{session['id']}/append", body={"text": text}, cast_to=object
        )
    return str(session["id"])


def errors_counted(route: str, code: str) -> float:
    labels = {"grpc_service": "http", "grpc_method": route, "grpc_code": code}
    return REGISTRY.get_sample_value("lens_rpc_errors_total", labels) or 0.0


async def test_models_lists_the_served_model(client: openai.AsyncOpenAI) -> None:
    models = [model async for model in client.models.list()]
    assert [(m.id, m.object, m.owned_by) for m in models] == [(MODEL, "model", "lens-serve")]


async def test_completion_returns_text_and_lens_usage(client: openai.AsyncOpenAI) -> None:
    completion = await client.completions.create(model=MODEL, prompt="x" * 300, max_tokens=3)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    [choice] = completion.choices
    assert (choice.text, choice.finish_reason, choice.logprobs) == (FAKE_TEXT * 3, "length", None)
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (300, 3, 303)
    lens = usage.lens  # type: ignore[attr-defined]
    assert lens["policy"] == "lens" and lens["session_id"] == "" and lens["wc_budget"] == 64
    assert lens["lifetime_tokens"] == 300 and 0 < lens["wc_rows"] <= 64
    spans = lens["working_context"]
    assert spans[0]["start"] == 0 and spans[-1]["end"] == 300 and spans[-1]["lod"] == 0
    assert lens["gist_covered_tokens"] == sum(s["end"] - s["start"] for s in spans if s["lod"])


async def test_completion_takes_prompt_token_ids(
    served: Served, client: openai.AsyncOpenAI
) -> None:
    completion = await client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=1)
    assert completion.usage is not None and completion.usage.prompt_tokens == 3
    assert served.engine.prompts[-1].shape[0] == 3


async def test_chat_completion_renders_the_messages_with_the_chat_template(
    served: Served, client: openai.AsyncOpenAI
) -> None:
    completion = await client.chat.completions.create(model=MODEL, messages=CHAT)
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    [choice] = completion.choices
    assert choice.message.role == "assistant" and choice.message.content == FAKE_TEXT * 4
    assert choice.finish_reason == "length"
    rendered = served.engine.apply_chat_template(CHAT_MESSAGES)
    assert completion.usage is not None and completion.usage.prompt_tokens == len(rendered)
    assert served.engine.prompts[-1].shape[0] == len(rendered)  # the whole chat, no WC cut


async def test_streamed_completion_sends_deltas_then_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.completions.create(
        model=MODEL,
        prompt="hello",
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == FAKE_TEXT * 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, None, "length"]
    assert len({c.id for c in chunks}) == 1
    *_, last = chunks
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 3
    assert last.usage.lens["lifetime_tokens"] == 5  # type: ignore[attr-defined]


async def test_streamed_chat_sends_the_role_then_deltas(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model=MODEL, messages=CHAT, stream=True)
    chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta for c in chunks]
    assert [d.role for d in deltas] == ["assistant", None, None, None]
    assert "".join(d.content or "" for d in deltas) == FAKE_TEXT * 4
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no include_usage


async def test_session_turn_through_the_lens_field_appends_prompt_and_answer(
    served: Served, client: openai.AsyncOpenAI
) -> None:
    session_id = await new_session(client, "hello world " * 20)
    question: list[ChatCompletionMessageParam] = [{"role": "user", "content": "what?"}]
    lens = {"session_id": session_id, "wc_budget": 128, "policy": "retrieval"}
    completion = await client.chat.completions.create(
        model=MODEL, messages=question, max_tokens=2, extra_body={"lens": lens}
    )
    prompt = served.engine.apply_chat_template([{"role": "user", "content": "what?"}])
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens == len(prompt)
    lens_usage = usage.lens  # type: ignore[attr-defined]
    assert lens_usage["session_id"] == session_id and lens_usage["policy"] == "retrieval"
    assert lens_usage["lifetime_tokens"] == 240 + len(prompt) and lens_usage["wc_budget"] == 128
    # The working context was chosen for the user's question, not the whole rendered chat.
    assert (lens_usage["query_source"], lens_usage["query_tokens"]) == ("prompt", len("what?"))
    session: Any = await client.get(f"/lens/sessions/{session_id}", cast_to=object)
    assert session["lifetime_tokens"] == 240 + len(prompt) + 2
    tokens = await served.service.sessions.tokens(session_id, session_owner(served, TOKEN))
    assert tokens[-len(prompt) - 2 :].tolist() == [*prompt, 7, 7]


def session_owner(served: Served, token: str) -> str:
    from lens_serve.service.auth import owner_for_token

    return owner_for_token(token)


@pytest.mark.parametrize(
    ("arguments", "param"),
    [
        ({"temperature": 50}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"seed": 0}, "seed"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"extra_body": {"repetition_penalty": 5}}, "repetition_penalty"),
        ({"extra_body": {"top_k": -3}}, "top_k"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"5": 1}}, "logit_bias"),
        ({"extra_body": {"lens": {"policy": "nope"}}}, "lens.policy"),
        ({"extra_body": {"lens": {"wc_budget": 100_000}}}, "lens.wc_budget"),
        ({"extra_body": {"lens": {"wc_budget": -1}}}, "lens.wc_budget"),
        ({"extra_body": {"lens": {"session_id": "s" * 65}}}, "lens.session_id"),
        ({"extra_body": {"lens": {"session": "x"}}}, "lens.session"),
        ({"n": 2, "extra_body": {"lens": {"session_id": "0" * 32}}}, "n"),
        ({"messages": [{"role": "narrator", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": []}, "messages"),
    ],
)
async def test_bad_field_is_400_naming_the_param(
    client: openai.AsyncOpenAI, arguments: dict[str, Any], param: str
) -> None:
    route = "POST /v1/chat/completions"
    before = errors_counted(route, "INVALID_ARGUMENT")
    request: dict[str, Any] = {"model": MODEL, "messages": CHAT, **arguments}
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(**request)
    error = caught.value
    assert (error.status_code, error.code) == (400, "INVALID_ARGUMENT")
    assert error.param is not None and error.param.startswith(param), error.body
    assert errors_counted(route, "INVALID_ARGUMENT") == before + 1


async def test_calls_are_traced_by_route_with_the_generation_under_them(
    client: openai.AsyncOpenAI, spans: InMemorySpanExporter
) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=3, stream=True
    )
    ids = {chunk.id async for chunk in stream}  # the whole stream: the call ends with it
    [request_id] = [i.removeprefix("chatcmpl-") for i in ids]
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="other", messages=CHAT)
    for _ in range(200):  # a span ends once its response is sent: maybe after the client read it
        calls = [s for s in spans.get_finished_spans() if s.name == "POST /v1/chat/completions"]
        if len(calls) == 2:
            break
        await asyncio.sleep(0.01)
    [served] = [s for s in calls if s.status.status_code is not StatusCode.ERROR]
    [refused] = [s for s in calls if s.status.status_code is StatusCode.ERROR]
    assert refused.status.description == "NOT_FOUND"
    assert served.attributes is not None
    assert served.attributes["http.request.method"] == "POST"
    assert served.attributes["http.route"] == "/v1/chat/completions"
    assert served.attributes["lens.request_id"] == request_id
    children = [s for s in spans.get_finished_spans() if s.parent is not None]
    assert sorted(s.name for s in children) == ["choose_wc", "engine"]
    assert {s.parent.span_id for s in children if s.parent} == {served.context.span_id}


async def test_bad_completion_prompt_is_400_naming_the_prompt(client: openai.AsyncOpenAI) -> None:
    for prompt in ([10_000], "", ["a", "b"]):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model=MODEL, prompt=prompt)
        assert caught.value.param == "prompt", caught.value.body


async def test_unknown_session_is_404_streamed_or_not(client: openai.AsyncOpenAI) -> None:
    lens = {"lens": {"session_id": "0" * 32}}
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(
                model=MODEL, messages=CHAT, stream=stream, extra_body=lens
            )
        assert caught.value.code == "NOT_FOUND"


async def test_unknown_model_is_404_naming_the_model(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert caught.value.param == "model" and "gpt-4o" in caught.value.message


async def test_missing_or_unknown_token_is_401(served: Served) -> None:
    async with served.client("not-a-token") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model=MODEL, messages=CHAT)
    assert caught.value.code == "UNAUTHENTICATED"
    assert caught.value.response.headers["www-authenticate"] == "Bearer"
    async with httpx.AsyncClient(base_url=served.base_url) as bare:
        response = await bare.get("/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "UNAUTHENTICATED"


async def test_sessions_are_isolated_per_token(served: Served, client: openai.AsyncOpenAI) -> None:
    session_id = await new_session(client, "mine")
    async with served.client(OTHER_TOKEN) as other:
        with pytest.raises(openai.NotFoundError):
            await other.chat.completions.create(
                model=MODEL, messages=CHAT, extra_body={"lens": {"session_id": session_id}}
            )
        with pytest.raises(openai.NotFoundError):
            await other.get(f"/lens/sessions/{session_id}", cast_to=object)
    session: Any = await client.get(f"/lens/sessions/{session_id}", cast_to=object)
    assert session["lifetime_tokens"] == len("mine")  # the other token's turn appended nothing


async def test_deleted_session_is_gone(client: openai.AsyncOpenAI) -> None:
    session_id = await new_session(client)
    deleted: Any = await client.delete(f"/lens/sessions/{session_id}", cast_to=object)
    assert deleted == {"id": session_id, "object": "lens.session.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        await client.get(f"/lens/sessions/{session_id}", cast_to=object)


async def test_choices_without_a_session_are_generated_with_seeds_in_turn(
    served: Served, client: openai.AsyncOpenAI
) -> None:
    completion = await client.chat.completions.create(model=MODEL, messages=CHAT, n=3, seed=5)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert all(c.message.content == FAKE_TEXT * 4 for c in completion.choices)
    assert sorted(p.seed or 0 for p in served.engine.params[-3:]) == [5, 6, 7]
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    stream = await client.completions.create(model=MODEL, prompt="hi", n=2, stream=True)
    texts = ["", ""]
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [FAKE_TEXT * 4] * 2


async def test_logprobs_come_with_every_token(client: openai.AsyncOpenAI) -> None:
    chat = await client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=2, logprobs=True, top_logprobs=3
    )
    logprobs = chat.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None and len(logprobs.content) == 2
    first = logprobs.content[0]
    assert (first.token, first.logprob, first.bytes) == (FAKE_TEXT, FAKE_LOGPROB, [4])
    assert [t.logprob for t in first.top_logprobs] == [FAKE_LOGPROB - k for k in range(3)]
    completion = await client.completions.create(
        model=MODEL, prompt="hi", max_tokens=2, logprobs=1, stream=True
    )
    entries = [chunk.choices[0].logprobs async for chunk in completion]
    assert all(e is not None and e.token_logprobs == [FAKE_LOGPROB] for e in entries)
    assert [e.text_offset for e in entries if e is not None] == [[0], [1]]
    assert entries[0] is not None and entries[0].top_logprobs == [{FAKE_TEXT: FAKE_LOGPROB}]


async def test_sampling_options_reach_the_engine(
    served: Served, client: openai.AsyncOpenAI
) -> None:
    await client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0.5, top_p=0.9, seed=3, stop=["\n"],
        presence_penalty=0.5, frequency_penalty=-0.5,
        extra_body={"top_k": 5, "repetition_penalty": 1.2},
    )  # fmt: skip
    params = served.engine.params[-1]
    assert (params.temperature, params.seed, tuple(params.stop)) == (0.5, 3, ("\n",))
    assert params.top_p == pytest.approx(0.9)
    assert (params.top_k, params.presence_penalty, params.frequency_penalty) == (5, 0.5, -0.5)
    assert params.repetition_penalty == pytest.approx(1.2) and params.logprobs is None
    await client.chat.completions.create(model=MODEL, messages=CHAT, extra_body={"top_k": -1})
    params = served.engine.params[-1]
    assert (params.top_k, params.repetition_penalty, params.temperature) == (0, 1.0, 1.0)


async def test_body_over_the_size_limit_is_413(redis_client: Redis) -> None:
    async with serving(redis_client, max_message_bytes=1024) as served, served.client() as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.completions.create(model=MODEL, prompt="x" * 2000)
        assert caught.value.status_code == 413 and caught.value.param == "body"
        assert caught.value.code == "RESOURCE_EXHAUSTED"
        assert errors_counted("POST /v1/completions", "RESOURCE_EXHAUSTED") >= 1


async def test_client_leaving_a_stream_aborts_its_generation(
    served: Served, client: openai.AsyncOpenAI
) -> None:
    served.engine.gate = gate = asyncio.Event()
    gate.set()
    stream = await client.completions.create(model=MODEL, prompt="hi", max_tokens=1000, stream=True)
    await anext(aiter(stream))
    gate.clear()  # the generation now waits before its next token
    await stream.close()
    for _ in range(1000):  # the server sees the disconnect a few loop turns later
        if served.engine.aborted:
            break
        await asyncio.sleep(0.01)
    assert served.engine.aborted


async def test_stop_drains_streams_in_flight_and_refuses_new_calls(
    served: Served, client: openai.AsyncOpenAI
) -> None:
    served.engine.gate = gate = asyncio.Event()
    gate.set()
    stream = await client.completions.create(model=MODEL, prompt="hi", max_tokens=50, stream=True)
    chunks = aiter(stream)
    first = await anext(chunks)
    gate.clear()
    stop = asyncio.Event()
    served.http.stop_when(stop)
    stop.set()
    await asyncio.sleep(0.3)  # uvicorn looks at its exit flag every 0.1 s
    async with served.client() as late:
        with pytest.raises(openai.APIConnectionError):
            await late.models.list()
    gate.set()
    rest = [chunk async for chunk in chunks]
    text = first.choices[0].text + "".join(c.choices[0].text for c in rest)
    assert text == FAKE_TEXT * 50 and rest[-1].choices[0].finish_reason == "length"
