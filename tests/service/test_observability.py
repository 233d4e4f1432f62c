"""Observability of a request: token counters, time per output token, build info, and the
request and session ids on every log record emitted while it runs."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import pytest
import torch
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from lens_serve import log
from lens_serve.engine.protocol import GenerationParams
from lens_serve.service.composition import package_version, record_build_info
from lens_serve.service.config import Settings
from lens_serve.service.requests import GenerateInput
from tests.service.test_lens_service import OWNER, collect, make_service

engine_logger = logging.getLogger("tests.fake_engine")


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_generate_counts_tokens_and_observes_time_per_output_token(
    redis_client: Redis,
) -> None:
    service = make_service(redis_client)
    before = {
        name: sample(name)
        for name in (
            "lens_prompt_tokens_total",
            "lens_generation_tokens_total",
            "lens_generate_time_per_output_token_seconds_count",
            "lens_generate_time_to_first_token_seconds_count",
        )
    }
    events = await collect(service.generate(OWNER, GenerateInput(prompt="x" * 300)))
    usage = events[-1].usage
    assert usage is not None and usage.completion_tokens == 4
    assert sample("lens_prompt_tokens_total") == before["lens_prompt_tokens_total"] + 300
    assert sample("lens_generation_tokens_total") == before["lens_generation_tokens_total"] + 4
    name = "lens_generate_time_per_output_token_seconds_count"
    assert sample(name) == before[name] + 1
    name = "lens_generate_time_to_first_token_seconds_count"
    assert sample(name) == before[name] + 1


async def test_one_token_answer_observes_no_time_per_output_token(redis_client: Redis) -> None:
    service = make_service(redis_client, max_tokens=1)
    name = "lens_generate_time_per_output_token_seconds_count"
    before = sample(name)
    await collect(service.generate(OWNER, GenerateInput(prompt="x" * 50)))
    assert sample(name) == before


def test_build_info_names_version_model_and_python() -> None:
    import platform

    record_build_info(Settings(model="fake-model"))  # type: ignore[call-arg]
    labels = {"version": package_version(), "model": "fake-model",
              "python": platform.python_version()}  # fmt: skip
    assert sample("lens_build_info", labels) == 1


async def test_log_lines_inside_generate_carry_request_and_session_ids(
    redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    service = make_service(redis_client)
    inner = service.engine.generate

    def logging_generate(
        embeds: torch.Tensor, params: GenerationParams, request_id: str
    ) -> AsyncIterator[object]:
        engine_logger.warning("engine starts %s", request_id)
        return inner(embeds, params, request_id)

    service.engine.generate = logging_generate  # type: ignore[method-assign,assignment]
    session = await service.create_session(OWNER)
    caplog.handler.addFilter(log.RequestIdFilter())
    with caplog.at_level(logging.INFO, logger=engine_logger.name):
        events = await collect(service.generate(OWNER, GenerateInput(session.session_id, "hi")))
    [record] = [r for r in caplog.records if r.name == engine_logger.name]
    assert record.request_id == events[0].request_id  # type: ignore[attr-defined]
    assert record.session_id == session.session_id  # type: ignore[attr-defined]
    # Outside the request the ids are gone again.
    assert log.REQUEST_ID.get() == "" and log.SESSION_ID.get() == ""
    text = logging.Formatter(log.TEXT_FORMAT).format(record)
    assert f"request={events[0].request_id} session={session.session_id}" in text
    entry = json.loads(log.JsonFormatter().format(record))
    assert entry["request_id"] == events[0].request_id
    assert entry["session_id"] == session.session_id


def test_records_outside_a_request_carry_no_ids() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    assert log.RequestIdFilter().filter(record)
    assert logging.Formatter(log.TEXT_FORMAT).format(record).endswith(" x: hello")
    assert "request_id" not in json.loads(log.JsonFormatter().format(record))
