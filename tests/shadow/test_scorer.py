"""ShadowScorer and build_job: a FakeEngine and a real redis-server (tests/fixtures_redis.py)."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import pytest_asyncio
import torch
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from lens_serve.core.counterfactual import UnitChoice
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.gistnet import GistNet, GistNetConfig, build_gistnet
from lens_serve.core.lensnet import unit_inputs
from lens_serve.core.policies import Choice, ContextChooser
from lens_serve.core.tree import LifetimeTree
from lens_serve.shadow.jobs import ShadowJob, build_job
from lens_serve.shadow.scorer import BASELINES, SHADOW_PRIORITY, ShadowConfig, ShadowScorer
from lens_serve.store.preferences import (
    PREFS_STREAM,
    PreferenceLog,
    decode_record,
    spec_from_working_context,
    tiling_from_spec,
)
from lens_serve.store.record_units import decode_units
from lens_serve.v1 import lens_serve_pb2 as pb
from tests.core_helpers import HIDDEN, VOCAB, chooser, random_table
from tests.fakes import FakeEngine

BLOCK = 4
BUDGET = 32
TAIL = 8
LIFETIME = 100
PROMPT_LEN = 10
COMPLETION = [5, 6, 7]
MODEL = "fake-model"


class ScoringEngine(FakeEngine):
    """FakeEngine whose logprobs say how many context rows they were given: target token i gets
    -rows / 64 - i / 8 (exact in float32), so each variant's NLL names its context. Records what it
    was asked."""

    def __init__(self, table: EmbeddingTable) -> None:
        super().__init__(table)
        self.calls: list[tuple[int, list[int], str, int]] = []  # rows, target, request id, prio

    async def score(
        self,
        context_embeds: torch.Tensor,
        continuation_ids: Sequence[int],
        request_id: str,
        priority: int = 0,
    ) -> list[float]:
        rows = int(context_embeds.shape[0])
        self.calls.append((rows, list(continuation_ids), request_id, priority))
        return [-rows / 64 - i / 8 for i in range(len(continuation_ids))]


def nll_of(rows: int, targets: int) -> float:
    """ScoringEngine's mean NLL after `rows` context rows."""
    return sum(rows / 64 + i / 8 for i in range(targets)) / targets


class Parts:
    """One table + GistNet, a tree factory over them, a chooser and a 100-token tree."""

    def __init__(self) -> None:
        self.table = random_table()
        self.gistnet: GistNet = build_gistnet(
            GistNetConfig(block_size=BLOCK, hidden_size=HIDDEN, width=16), self.table
        )
        self.chooser: ContextChooser = chooser()
        self.tokens = np.random.default_rng(1).integers(0, VOCAB, LIFETIME)
        self.tree = self.make_tree(self.tokens)

    def make_tree(self, token_ids: np.ndarray) -> LifetimeTree:
        tree = LifetimeTree(self.gistnet, self.table)
        tree.append(token_ids)
        return tree

    def choice(self, tree: LifetimeTree | None = None, policy: str = "lens") -> Choice:
        return self.chooser.choose(self.tree if tree is None else tree, policy, BUDGET, TAIL)

    def job(
        self,
        request_id: str = "req-1",
        *,
        target: Literal["completion", "prompt"] = "completion",
        target_tokens: int = 4,
        prompt: Sequence[int] | None = None,
        completion: Sequence[int] = tuple(COMPLETION),
    ) -> ShadowJob | None:
        choice = self.choice()
        assert choice.focus is not None
        return build_job(
            request_id=request_id,
            session_id="sess-1",
            policy="lens",
            tree=self.tree,
            served=choice.working_context,
            served_tiling=choice.focus.tiling,
            prompt=self.tokens[-PROMPT_LEN:].tolist() if prompt is None else prompt,
            completion=completion,
            budget=BUDGET,
            tail=TAIL,
            chooser=self.chooser,
            target=target,
            target_tokens=target_tokens,
        )

    def scorer(
        self, engine: FakeEngine, redis: Redis, config: ShadowConfig | None = None
    ) -> ShadowScorer:
        return ShadowScorer(
            engine,
            PreferenceLog(redis),
            config or ShadowConfig(rate=1.0, random_variants=4, edits_per_variant=2, seed=3),
            model=MODEL,
            make_tree=self.make_tree,
        )


def some_job(
    parts: Parts,
    request_id: str = "req-1",
    *,
    target: Literal["completion", "prompt"] = "completion",
    target_tokens: int = 4,
) -> ShadowJob:
    job = parts.job(request_id, target=target, target_tokens=target_tokens)
    assert job is not None
    return job


def dropped(reason: str) -> float:
    value = REGISTRY.get_sample_value("lens_shadow_jobs_dropped_total", {"reason": reason})
    return value or 0.0


async def stored_records(redis: Redis) -> list[pb.PreferenceRecord]:
    entries = await redis.xrange(PREFS_STREAM)
    assert entries is not None
    return [decode_record(fields or {}) for _, fields in entries]


@pytest.fixture
def parts() -> Parts:
    return Parts()


@pytest_asyncio.fixture
async def running() -> AsyncIterator[list[asyncio.Task[None]]]:
    """Worker tasks a test starts; cancelled (and awaited) at teardown."""
    tasks: list[asyncio.Task[None]] = []
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with pytest.raises(asyncio.CancelledError):
                await task


def start(scorer: ShadowScorer, tasks: list[asyncio.Task[None]]) -> asyncio.Task[None]:
    task = asyncio.create_task(scorer.run())
    tasks.append(task)
    return task


# -- build_job ---------------------------------------------------------------------------------


def test_build_job_returns_none_when_completion_is_empty(parts: Parts) -> None:
    assert parts.job(completion=()) is None


def test_build_job_returns_none_when_prompt_target_has_one_token_prompt(parts: Parts) -> None:
    one = [int(parts.tokens[-1])]
    assert parts.job(target="prompt", prompt=one, completion=COMPLETION) is None
    assert parts.job(target="prompt", prompt=one, completion=()) is None


def test_build_job_keeps_lifetime_and_served_wc_when_target_is_completion(parts: Parts) -> None:
    job = some_job(parts)
    served = parts.choice().working_context
    assert job.target_ids == COMPLETION
    assert job.lifetime_tokens.tolist() == parts.tokens.tolist()
    assert job.served is not None and job.served.signature() == served.signature()
    assert job.served_tiling is not None
    assert (job.request_id, job.session_id, job.policy) == ("req-1", "sess-1", "lens")
    assert (job.budget, job.tail, job.chooser) == (BUDGET, TAIL, parts.chooser)


def test_build_job_copies_lifetime_tokens_when_built(parts: Parts) -> None:
    job = some_job(parts)
    parts.tree.append([1, 2, 3])  # the session's tree grows after the request
    assert job.lifetime_tokens.shape == (LIFETIME,)
    assert not np.shares_memory(job.lifetime_tokens, parts.tree.tokens())


def test_build_job_holds_out_prompt_tail_when_target_is_prompt(parts: Parts) -> None:
    job = some_job(parts, target="prompt", target_tokens=4)
    assert job.target_ids == parts.tokens[-4:].tolist()
    assert job.lifetime_tokens.tolist() == parts.tokens[:-4].tolist()
    assert job.served is None and job.served_tiling is None


def test_build_job_drops_held_out_answer_from_query_when_prompt_was_the_query(
    parts: Parts,
) -> None:
    choice = parts.choice()
    assert choice.focus is not None
    prompt = parts.tokens[-PROMPT_LEN:].tolist()
    job = build_job(
        request_id="r", session_id="s", policy="lens", tree=parts.tree,
        served=choice.working_context, served_tiling=choice.focus.tiling, prompt=prompt,
        completion=(), budget=BUDGET, tail=TAIL, chooser=parts.chooser, target="prompt",
        target_tokens=4, query=prompt,
    )  # fmt: skip
    assert job is not None and job.query is not None
    assert job.query.tolist() == prompt[:-4]  # BM25 must not find the fact by the answer itself


def test_build_job_holds_out_all_but_first_prompt_token_when_target_tokens_exceed(
    parts: Parts,
) -> None:
    job = some_job(parts, target="prompt", target_tokens=1000)
    held = PROMPT_LEN - 1
    assert job.target_ids == parts.tokens[-held:].tolist()
    assert job.lifetime_tokens.tolist() == parts.tokens[:-held].tolist()


# -- wants -------------------------------------------------------------------------------------


def scorer_with(parts: Parts, redis: Redis, rate: float, seed: int) -> ShadowScorer:
    config = ShadowConfig(rate=rate, seed=seed)
    return parts.scorer(FakeEngine(parts.table), redis, config)


async def test_wants_never_when_rate_is_zero(parts: Parts, redis_client: Redis) -> None:
    scorer = scorer_with(parts, redis_client, rate=0.0, seed=1)
    assert not any(scorer.wants() for _ in range(1000))


async def test_wants_always_when_rate_is_one(parts: Parts, redis_client: Redis) -> None:
    scorer = scorer_with(parts, redis_client, rate=1.0, seed=1)
    assert all(scorer.wants() for _ in range(1000))


async def test_wants_follows_seeded_draws_when_rate_is_fractional(
    parts: Parts, redis_client: Redis
) -> None:
    decisions = [
        [scorer_with(parts, redis_client, rate=0.3, seed=seed) for _ in range(2)] for seed in (7, 8)
    ]
    runs = [[[s.wants() for _ in range(400)] for s in pair] for pair in decisions]
    for seed, (first, second) in zip((7, 8), runs, strict=True):
        draws = random.Random(seed)
        assert first == [draws.random() < 0.3 for _ in range(400)]
        assert first == second  # the same seed decides the same way
        assert 0.2 < sum(first) / len(first) < 0.4
    assert runs[0][0] != runs[1][0]  # another seed decides otherwise


# -- submit ------------------------------------------------------------------------------------


async def test_submit_drops_and_counts_job_when_queue_is_full(
    parts: Parts, redis_client: Redis, running: list[asyncio.Task[None]]
) -> None:
    config = ShadowConfig(rate=1.0, queue_size=1, random_variants=0, seed=3)
    scorer = parts.scorer(FakeEngine(parts.table), redis_client, config)
    before = dropped("queue_full")
    scorer.submit(some_job(parts, "kept"))
    scorer.submit(some_job(parts, "dropped-1"))  # returns at once: no worker is running
    scorer.submit(some_job(parts, "dropped-2"))
    assert dropped("queue_full") == before + 2
    start(scorer, running)
    await asyncio.wait_for(scorer.drain(), 30)
    assert [r.request_id for r in await stored_records(redis_client)] == ["kept"]
    assert scorer.recorded == 1


# -- the worker --------------------------------------------------------------------------------


async def test_run_writes_one_record_with_all_variants_when_given_one_job(
    parts: Parts, redis_client: Redis, running: list[asyncio.Task[None]]
) -> None:
    engine = ScoringEngine(parts.table)
    scorer = parts.scorer(engine, redis_client)
    job = some_job(parts)
    scorer.submit(job)
    start(scorer, running)
    await asyncio.wait_for(scorer.drain(), 30)

    records = await stored_records(redis_client)
    assert len(records) == 1 and scorer.recorded == 1
    record = records[0]
    assert record.model == MODEL and record.request_id == "req-1"
    assert record.session_id == "sess-1"
    assert record.lens_version == parts.chooser.lens_version
    assert record.gistnet_version == parts.tree.gistnet_version
    assert (record.block_size, record.gist_rows, record.tail, record.budget) == (
        BLOCK,
        1,
        TAIL,
        BUDGET,
    )
    assert record.lifetime == LIFETIME and not record.lifetime_token_ids  # bounded: no lifetime
    assert list(record.target_token_ids) == COMPLETION
    assert record.created_at_ms > 0

    kinds = [v.kind for v in record.variants]
    # served first, then the random edits, then the baselines other than the served policy
    # ("full" is skipped: 100 tokens do not fit 32 rows raw).
    baselines = [p for p in BASELINES if p not in ("lens", "full")]
    assert "uniform" in baselines and "recency" in baselines
    nb = len(baselines)
    assert kinds[0] == "served" and kinds.count("served") == 1
    assert kinds[-nb:] == baselines
    assert set(kinds[1:-nb]) == {"random"} and 1 <= len(kinds) - 1 - nb <= 4

    served = parts.choice().working_context
    assert record.variants[0].spec == spec_from_working_context(served)
    for variant, policy in zip(record.variants[-nb:], baselines, strict=True):
        wc = parts.choice(policy=policy).working_context
        assert variant.spec == spec_from_working_context(wc)

    # One engine call per variant and per measured unit, at shadow priority, on the target.
    assert len(engine.calls) == len(kinds) + len(record.unit_gains)
    assert all(call[1] == COMPLETION and call[3] == SHADOW_PRIORITY for call in engine.calls)
    assert len({call[2] for call in engine.calls}) == len(engine.calls)
    assert all(call[2].startswith("shadow-") for call in engine.calls)
    for variant in record.variants:  # each NLL is the one measured after that variant's rows
        assert variant.mean_nll == pytest.approx(nll_of(wc_rows(variant.spec), len(COMPLETION)))

    signatures = {v.spec.SerializeToString() for v in record.variants[:-nb]}
    assert len(signatures) == len(kinds) - nb  # no random variant repeats another or the served
    for variant in record.variants:
        if variant.kind != "random":
            assert list(variant.edit_probs) == [] and variant.log_prob == 0.0
            continue
        probs = list(variant.edit_probs)
        assert 1 <= len(probs) <= 2
        assert all(0.0 < p <= 1.0 for p in probs)
        assert variant.log_prob == pytest.approx(sum(math.log(p) for p in probs))
        tiling = tiling_from_spec(variant.spec, LIFETIME, BLOCK, 1)
        assert tiling is not None and tiling.rows <= BUDGET


def wc_rows(spec: pb.WorkingContextSpec) -> int:
    """Rows of a working context given as spans (gists take one row, no frame here)."""
    return sum(
        s.end - s.start if s.lod == 0 else (s.end - s.start) // BLOCK**s.lod for s in spec.spans
    )


async def test_run_records_lensnet_inputs_and_one_unit_gains_of_served_tiling(
    parts: Parts, redis_client: Redis, running: list[asyncio.Task[None]]
) -> None:
    engine = ScoringEngine(parts.table)
    scorer = parts.scorer(engine, redis_client)
    scorer.submit(some_job(parts))
    start(scorer, running)
    await asyncio.wait_for(scorer.drain(), 30)
    (record,) = await stored_records(redis_client)

    focus = parts.choice().focus
    assert focus is not None
    tiling = focus.tiling
    expected = unit_inputs(parts.tree, tiling, TAIL)
    inputs, prior = decode_units(list(record.units), parts.table)
    assert [(u.lod, u.index) for u in record.units[: len(tiling.units)]] == tiling.units
    assert torch.allclose(inputs.content, expected.content)
    assert torch.equal(inputs.lods, expected.lods)
    assert torch.allclose(inputs.features, expected.features)
    assert prior.shape == (len(expected),)

    gains = list(record.unit_gains)
    assert 1 <= len(gains) <= UnitChoice().total
    assert len({g.unit for g in gains}) == len(gains)  # each unit measured once
    for gain in gains:
        lod = tiling.units[gain.unit][0]
        assert gain.edit == ("expand" if lod >= 1 else "collapse")
        assert gain.source in ("prior", "lens", "random") and 0 < gain.probability <= 1
        # Its NLL is the one measured after the changed tiling's rows (a collapse frees B - 1).
        if gain.edit == "collapse":
            assert gain.mean_nll == pytest.approx(
                nll_of(tiling.rows - (BLOCK - 1), len(COMPLETION))
            )
            assert gain.funding_collapses == 0


async def test_run_record_size_follows_budget_not_lifetime(
    parts: Parts, redis_client: Redis, running: list[asyncio.Task[None]]
) -> None:
    long_tokens = np.random.default_rng(2).integers(0, VOCAB, 20_000)
    parts.tokens, parts.tree = long_tokens, parts.make_tree(long_tokens)
    scorer = parts.scorer(ScoringEngine(parts.table), redis_client)
    scorer.submit(some_job(parts))
    start(scorer, running)
    await asyncio.wait_for(scorer.drain(), 30)
    (record,) = await stored_records(redis_client)
    assert record.lifetime == 20_000
    assert len(record.units) <= BUDGET + 1  # one per unit of a WC of BUDGET rows (+ partial)
    content_ids = sum(len(u.content_token_ids) for u in record.units)
    assert content_ids <= BUDGET + BLOCK  # the WC's rows: raw tokens and gist rows
    assert record.ByteSize() < 8 * 1024  # 20k tokens alone would take 40 KB as ids


async def test_run_drops_and_counts_record_when_over_max_record_bytes(
    parts: Parts, redis_client: Redis, running: list[asyncio.Task[None]]
) -> None:
    config = ShadowConfig(rate=1.0, max_record_bytes=100, seed=3)
    scorer = parts.scorer(ScoringEngine(parts.table), redis_client, config)
    before = dropped("too_large")
    worker = start(scorer, running)
    scorer.submit(some_job(parts))
    await asyncio.wait_for(scorer.drain(), 30)
    assert dropped("too_large") == before + 1
    assert await stored_records(redis_client) == [] and not worker.done()


async def test_run_uses_fake_engine_logprobs_when_scoring(
    parts: Parts, redis_client: Redis, running: list[asyncio.Task[None]]
) -> None:
    scorer = parts.scorer(FakeEngine(parts.table), redis_client)
    scorer.submit(some_job(parts))
    start(scorer, running)
    await asyncio.wait_for(scorer.drain(), 30)
    (record,) = await stored_records(redis_client)
    for variant in record.variants:  # FakeEngine returns logprob -0.5 for every token
        assert list(variant.token_nll) == [0.5, 0.5, 0.5]
        assert variant.mean_nll == 0.5


async def test_run_chooses_served_wc_over_shortened_lifetime_when_target_is_prompt(
    parts: Parts, redis_client: Redis, running: list[asyncio.Task[None]]
) -> None:
    engine = ScoringEngine(parts.table)
    scorer = parts.scorer(engine, redis_client)
    scorer.submit(some_job(parts, target="prompt", target_tokens=4))
    start(scorer, running)
    await asyncio.wait_for(scorer.drain(), 30)
    (record,) = await stored_records(redis_client)
    short = parts.tokens[:-4]
    assert record.lifetime == len(short)
    assert list(record.target_token_ids) == parts.tokens[-4:].tolist()
    served = parts.choice(parts.make_tree(short)).working_context
    assert served.lifetime == LIFETIME - 4
    assert record.variants[0].kind == "served"
    assert record.variants[0].spec == spec_from_working_context(served)
    assert all(len(v.token_nll) == 4 for v in record.variants)
    assert all(call[1] == parts.tokens[-4:].tolist() for call in engine.calls)


async def test_run_drops_and_counts_job_when_redis_is_unreachable(
    parts: Parts, tmp_path: Path, running: list[asyncio.Task[None]]
) -> None:
    # No socket at this path; no retries, so each append fails at once.
    dead = Redis(
        unix_socket_path=str(tmp_path / "closed.sock"),
        socket_connect_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        scorer = parts.scorer(FakeEngine(parts.table), dead)
        before_redis, before_error = dropped("redis"), dropped("error")
        worker = start(scorer, running)
        scorer.submit(some_job(parts, "first"))
        await asyncio.wait_for(scorer.drain(), 60)
        assert dropped("redis") == before_redis + 1
        assert not worker.done()  # the worker survives and takes the next job
        scorer.submit(some_job(parts, "second"))
        await asyncio.wait_for(scorer.drain(), 60)
        assert dropped("redis") == before_redis + 2
        assert dropped("error") == before_error
        assert scorer.recorded == 0 and not worker.done()
    finally:
        await dead.aclose()
