"""The OpenAI-compatible endpoint end to end: the official `openai` client, a real uvicorn, the
domain service of the in-process stack on the test session's vLLM engine (tiny model, CPU) and a
real redis-server."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import pytest_asyncio

from lens_serve.engine.vllm import VllmEngine
from lens_serve.http.server import HttpServer
from tests.integration.serving_fixtures import Stack, serving_stack

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.integration]

DOCUMENT = inspect.getsource(inspect)[:4000]  # real text the tiny tokenizer knows


@pytest_asyncio.fixture(loop_scope="session")
async def stack(
    vllm_engine: VllmEngine, tiny_model_dir: Path, redis_url: str
) -> AsyncIterator[Stack]:
    async with serving_stack(vllm_engine, tiny_model_dir, redis_url) as s:
        yield s
        await s.redis.flushdb()


@pytest_asyncio.fixture(loop_scope="session")
async def client(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    http = await HttpServer.start(stack.service)
    try:
        # No api_tokens in the stack's settings: any key is let in (the SDK insists on one).
        base_url = f"http://{http.address}/v1"
        async with openai.AsyncOpenAI(base_url=base_url, api_key="-", max_retries=0) as client:
            yield client
    finally:
        await http.stop()


async def test_chat_completion_with_logprobs_through_vllm(
    stack: Stack, client: openai.AsyncOpenAI
) -> None:
    model = stack.service.settings.model
    [listed] = [m.id async for m in client.models.list()]
    assert listed == model
    messages = [{"role": "system", "content": "Answer in code."}, {"role": "user", "content": "a"}]
    completion = await client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    [choice] = completion.choices
    assert choice.finish_reason in ("length", "stop") and choice.message.content
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == len(stack.service.engine.apply_chat_template(messages))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.lens["wc_rows"] == usage.prompt_tokens  # type: ignore[attr-defined]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    positions = choice.logprobs.content
    assert len(positions) == usage.completion_tokens
    for position in positions:
        top = [t.logprob for t in position.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True) and top[0] <= 0
        # Greedy with no penalties generates the most likely token.
        assert position.token == position.top_logprobs[0].token
        assert position.logprob == pytest.approx(top[0])
    assert "".join(p.token for p in positions) == choice.message.content


async def test_streamed_completion_through_vllm_equals_the_whole_answer(
    stack: Stack, client: openai.AsyncOpenAI
) -> None:
    model = stack.service.settings.model
    # The penalties and top_k reach vLLM (the repetition penalty through a mixed prompt).
    extra = {"top_k": 5, "repetition_penalty": 1.3, "lens": {"wc_budget": 128}}
    whole = await client.completions.create(
        model=model, prompt=DOCUMENT, max_tokens=6, temperature=0, presence_penalty=0.5,
        extra_body=extra,
    )  # fmt: skip
    stream = await client.completions.create(
        model=model, prompt=DOCUMENT, max_tokens=6, temperature=0, presence_penalty=0.5,
        extra_body=extra, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole.choices[0].text and len(streamed) > 0
    usage = chunks[-1].usage
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens
    lens = usage.lens  # type: ignore[attr-defined]
    assert lens["wc_budget"] == 128 and lens["wc_rows"] <= 128
    assert lens["lifetime_tokens"] == usage.prompt_tokens > 128  # chosen over the whole prompt
    assert any(span["lod"] > 0 for span in lens["working_context"])


async def test_repetition_penalty_does_not_depend_on_earlier_requests(
    stack: Stack, client: openai.AsyncOpenAI
) -> None:
    """vLLM's repetition penalty counts the prompt's token ids; a prompt of pure embeddings has
    none, and vLLM used to read the ids an earlier request left in the batch slot instead."""
    model = stack.service.settings.model
    extra = {"repetition_penalty": 1.5}
    prompt = "def main(argv):\n    parser = argparse.ArgumentParser()\n"
    first = await client.completions.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body=extra
    )
    answer = stack.service.engine.encode(first.choices[0].text)
    assert answer
    # A score request leaves the answer's ids over the prompt's positions of the batch slot.
    filler = (answer * 64)[:64]
    engine = stack.service.engine
    await engine.score(engine.embed(filler[:4]), filler[4:], "fill-the-slot")
    again = await client.completions.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body=extra
    )
    assert again.choices[0].text == first.choices[0].text
