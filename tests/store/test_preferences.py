"""Span specs <-> tilings, and the preference log on a real redis-server."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from lens_serve.core.context import (
    RECALL,
    Tiling,
    coarsest_tiling,
    fill_newest_first,
    levels_for,
)
from lens_serve.core.policies import recency
from lens_serve.core.sampler import sample_variant
from lens_serve.store.preferences import (
    PREFS_STREAM,
    RECORD_FIELD,
    PreferenceLog,
    decode_record,
    parse_record,
    spec_from_tiling,
    spec_from_working_context,
    tiling_from_spec,
)
from lens_serve.v1 import lens_serve_pb2 as pb
from tests.trainer_synthetic import needle_record


def _random_tiling(
    lifetime: int, block: int, rows: int, slack: int, edits: int, seed: int
) -> Tiling:
    tail = block * 2
    levels = levels_for(lifetime, block)
    coarse = coarsest_tiling(lifetime, tail, levels, block, rows)
    budget = coarse.rows + slack
    base = fill_newest_first(coarse, budget)
    counts = [lifetime // block**k for k in range(levels + 1)]
    rng = np.random.default_rng(seed)
    return sample_variant(base, budget, tail, counts, rng, edits).tiling


def _spec(*spans: tuple[int, int, int]) -> pb.WorkingContextSpec:
    return pb.WorkingContextSpec(
        spans=[pb.SpanSpec(start=s, end=e, lod=lod) for s, e, lod in spans]
    )


@settings(max_examples=60, deadline=None)
@given(
    lifetime=st.integers(0, 2000),
    block=st.sampled_from([2, 3, 4, 8]),
    rows=st.sampled_from([1, 2]),
    slack=st.integers(0, 200),
    edits=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_spec_round_trips_to_the_same_tiling_for_random_tilings(
    lifetime: int, block: int, rows: int, slack: int, edits: int, seed: int
) -> None:
    rows = rows if block % rows == 0 else 1
    tiling = _random_tiling(lifetime, block, rows, slack, edits, seed)
    spec = spec_from_tiling(tiling)
    back = tiling_from_spec(spec, lifetime, block, rows)
    assert back is not None
    assert back.units == tiling.units
    assert (back.lifetime, back.block_size, back.gist_rows) == (lifetime, block, rows)
    # The working context's run-length spans are the same spec.
    assert spec_from_working_context(tiling.to_working_context("lens")) == spec
    # Consecutive spans have different LODs (maximal runs) and tile [0, lifetime).
    spans = list(spec.spans)
    assert all(a.lod != b.lod and a.end == b.start for a, b in itertools.pairwise(spans))
    assert (spans[0].start if spans else 0) == 0


def test_tiling_from_spec_accepts_raw_runs_split_by_the_writer() -> None:
    spec = _spec((0, 16, 2), (16, 20, 0), (20, 26, 0))
    tiling = tiling_from_spec(spec, 26, 4, 1)
    assert tiling is not None
    assert tiling.units == [(2, 0), (0, 4), (0, 5)]


@settings(max_examples=40, deadline=None)
@given(
    lifetime=st.integers(64, 2000),
    recalled=st.lists(st.integers(0, 10), min_size=1, max_size=4, unique=True),
    where=st.integers(0, 1000),
    seed=st.integers(0, 2**16),
)
def test_spec_round_trips_a_tiling_with_recalled_blocks(
    lifetime: int, recalled: list[int], where: int, seed: int
) -> None:
    tiling = _random_tiling(lifetime, 4, 1, 40, 3, seed)
    # Recall copies of blocks older than their place (a block before the first unit's end).
    at = where % (len(tiling.units) + 1)
    frontier = tiling.unit_span(tiling.units[at - 1])[1] // 4 if at else 0
    blocks = sorted(b for b in recalled if b < frontier)
    units = [*tiling.units[:at], *((RECALL, b) for b in blocks), *tiling.units[at:]]
    with_recall = tiling.with_units(units)
    spec = spec_from_tiling(with_recall)
    back = tiling_from_spec(spec, lifetime, 4, 1)
    assert back is not None and back.units == with_recall.units
    assert spec_from_working_context(with_recall.to_working_context("lens")) == spec
    assert sum(s.end - s.start for s in spec.spans if s.recalled) == 4 * len(blocks)


def test_tiling_from_spec_refuses_a_recall_of_text_not_yet_seen() -> None:
    spec = _spec((0, 16, 2), (16, 20, 0))
    spec.spans.insert(1, pb.SpanSpec(start=12, end=16, lod=0, recalled=True))
    assert tiling_from_spec(spec, 20, 4, 1) is not None  # older than its place: fine
    spec.spans[1].start, spec.spans[1].end = 16, 20  # not yet seen at its place
    with pytest.raises(ValueError, match="recalled span"):
        tiling_from_spec(spec, 20, 4, 1)


def test_recency_spec_gives_none_when_old_text_is_dropped() -> None:
    wc = recency(500, 100, 4, 1)
    assert tiling_from_spec(spec_from_working_context(wc), 500, 4, 1) is None
    assert tiling_from_spec(pb.WorkingContextSpec(), 500, 4, 1) is None


def test_recency_spec_covering_everything_is_a_raw_tiling() -> None:
    wc = recency(50, 100, 4, 1)
    tiling = tiling_from_spec(spec_from_working_context(wc), 50, 4, 1)
    assert tiling is not None
    assert tiling.units == [(0, i) for i in range(12)]


@pytest.mark.parametrize(
    ("spans", "message"),
    [
        (((0, 16, 1), (20, 26, 0)), "gap"),
        (((0, 16, 1), (12, 26, 0)), "overlap"),
        (((0, 8, 1), (8, 24, 2), (24, 26, 0)), "not aligned"),
        (((0, 16, 1), (16, 24, 0)), "newest token"),
        (((0, 16, 1), (16, 16, 0), (16, 26, 0)), "empty"),
        (((0, 6, 0), (6, 24, 1), (24, 26, 0)), "not aligned"),
    ],
)
def test_tiling_from_spec_raises_when_the_spec_is_malformed(
    spans: tuple[tuple[int, int, int], ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        tiling_from_spec(_spec(*spans), 26, 4, 1)


async def test_records_appended_to_the_log_decode_to_the_same_record(redis_client: Redis) -> None:
    log = PreferenceLog(redis_client)
    records = [needle_record(seed) for seed in range(3)]
    ids = [await log.append(r) for r in records]
    assert all(isinstance(i, bytes) for i in ids)
    entries = await redis_client.xrange(PREFS_STREAM)
    assert entries is not None
    assert [e[0] for e in entries] == ids
    assert [decode_record(fields or {}) for _, fields in entries] == records


async def test_log_trims_to_about_maxlen_when_full(redis_client: Redis) -> None:
    log = PreferenceLog(redis_client, maxlen=10)
    record = needle_record(0)
    for _ in range(400):
        await log.append(record)
    # MAXLEN ~ trims whole macro-nodes only (100 entries each by default).
    assert 10 <= await redis_client.xlen(PREFS_STREAM) < 400


def test_decode_record_raises_when_the_entry_is_not_a_record() -> None:
    with pytest.raises(ValueError, match=RECORD_FIELD):
        decode_record({b"other": b"x"})
    with pytest.raises(ValueError, match="PreferenceRecord"):
        decode_record({RECORD_FIELD.encode(): b"\xff\xff\xff"})
    with pytest.raises(ValueError, match="no variants"):
        parse_record(b"")
