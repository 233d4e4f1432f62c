"""The learning loop against the real stack: shadow records in Redis, hot swap of published
LensNet versions under load, corrupt weights rejected, rollback through LensAdmin."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import torch
from prometheus_client import REGISTRY

from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.lensnet import LensNet, LensNetConfig
from lens_serve.engine.vllm import VllmEngine
from lens_serve.store import registry
from lens_serve.store.preferences import PREFS_STREAM, decode_record, tiling_from_spec
from lens_serve.store.record_units import decode_units
from lens_serve.v1 import lens_serve_pb2 as pb
from tests.integration.serving_fixtures import Stack, serving_stack
from tests.integration.test_serving import DOCUMENT

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.integration]


@pytest_asyncio.fixture(loop_scope="session")
async def stack(
    vllm_engine: VllmEngine, tiny_model_dir: Path, redis_url: str
) -> AsyncIterator[Stack]:
    async with serving_stack(
        vllm_engine, tiny_model_dir, redis_url, shadow_rate=1.0, shadow_variants=3
    ) as s:
        yield s
        await s.redis.flushdb()


def _trained_like(hidden: int, seed: int) -> LensNet:
    net = LensNet(LensNetConfig(hidden_size=hidden, seed=seed))
    with torch.no_grad():
        net.head.bias.fill_(0.01 * seed)  # any change makes a new content-addressed version
    return net


async def _usage(stack: Stack, **fields: object) -> pb.Usage:
    request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=4), **fields)  # type: ignore[arg-type]
    return [r async for r in stack.stub.Generate(request)][-1].usage


async def _serving_version(stack: Stack, version: str, limit_s: float = 10.0) -> None:
    for _ in range(int(limit_s / 0.05)):
        if stack.service.weights.version == version:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"server still runs {stack.service.weights.version}, not {version}")


async def test_shadow_records_appear_in_redis_and_decode(
    stack: Stack, tiny_model_dir: Path
) -> None:
    session = await stack.stub.CreateSession(pb.CreateSessionRequest())

    async def chunks() -> AsyncIterator[pb.AppendRequest]:
        yield pb.AppendRequest(session_id=session.session_id, text=DOCUMENT[:6000])

    await stack.stub.Append(chunks())
    usage = await _usage(stack, session_id=session.session_id, prompt="\n# end")
    assert stack.service.shadow is not None
    await stack.service.shadow.drain()
    entries = await stack.redis.xrange(PREFS_STREAM)
    assert entries is not None and len(entries) == 1
    fields = entries[0][1]
    assert fields is not None
    record = decode_record(fields)
    kinds = [v.kind for v in record.variants]
    assert kinds[0] == "served" and "random" in kinds and "recency" in kinds
    assert record.lens_version == usage.lens_version and record.session_id == session.session_id
    assert record.lifetime == usage.lifetime_tokens and not record.lifetime_token_ids
    assert len(record.target_token_ids) == usage.completion_tokens
    # LensNet's inputs for the served tiling, and one-unit changes of it measured through vLLM.
    inputs, _ = decode_units(list(record.units), EmbeddingTable.from_checkpoint(tiny_model_dir))
    assert len(inputs) == len(record.units) > 0
    assert record.unit_gains and all(g.mean_nll > 0 for g in record.unit_gains)
    for variant in record.variants:
        assert variant.mean_nll > 0 and len(variant.token_nll) == len(record.target_token_ids)
    served = tiling_from_spec(
        record.variants[0].spec, usage.lifetime_tokens, record.block_size, record.gist_rows
    )
    assert served is not None and served.rows <= record.budget


async def test_published_version_is_hot_swapped_while_requests_run(stack: Stack) -> None:
    hidden = stack.service.engine.hidden_size
    before = stack.service.weights.version
    requests = [
        asyncio.create_task(_usage(stack, prompt=f"def g{i}():" * 20, wc_budget=64))
        for i in range(8)
    ]
    await asyncio.sleep(0.2)
    version = await registry.LENSNET.publish(stack.redis, _trained_like(hidden, 1), parent=before)
    served = await asyncio.gather(*requests)  # none fails during the swap
    assert {u.lens_version for u in served} <= {before, version}
    await _serving_version(stack, version)
    assert (await _usage(stack, prompt="x" * 100)).lens_version == version


async def test_corrupt_weights_are_rejected_and_the_old_version_keeps_serving(
    stack: Stack,
) -> None:
    hidden = stack.service.engine.hidden_size
    good = await registry.LENSNET.publish(stack.redis, _trained_like(hidden, 2))
    await _serving_version(stack, good)
    failures = REGISTRY.get_sample_value("lens_lensnet_swap_failures_total") or 0.0
    bad = await registry.LENSNET.publish(stack.redis, _trained_like(hidden, 3), make_current=False)
    await stack.redis.hset(registry.LENSNET.key(bad), "sha256", "0" * 64)  # corrupted in storage
    await registry.LENSNET.set_current(stack.redis, bad)
    for _ in range(100):
        if (REGISTRY.get_sample_value("lens_lensnet_swap_failures_total") or 0.0) > failures:
            break
        await asyncio.sleep(0.05)
    assert (REGISTRY.get_sample_value("lens_lensnet_swap_failures_total") or 0.0) > failures
    assert stack.service.weights.version == good
    assert (await _usage(stack, prompt="still serving")).lens_version == good


async def test_rollback_through_lens_admin(stack: Stack) -> None:
    hidden = stack.service.engine.hidden_size
    first = await registry.LENSNET.publish(stack.redis, _trained_like(hidden, 4))
    second = await registry.LENSNET.publish(stack.redis, _trained_like(hidden, 5), parent=first)
    await _serving_version(stack, second)
    reply = await stack.admin.SetLensVersion(pb.SetLensVersionRequest(version=first))
    assert (reply.previous_version, reply.current_version) == (second, first)
    await _serving_version(stack, first)
    status = await stack.admin.GetLensStatus(pb.GetLensStatusRequest())
    assert status.current_version == first and {first, second} <= set(status.versions)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stack.admin.SetLensVersion(pb.SetLensVersionRequest(version="lens-missing"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await stack.admin.GetLensStatus(pb.GetLensStatusRequest())).current_version == first
