"""The preference log shared by the server (writer) and the trainer (reader).

Records are serialized `PreferenceRecord` protos in the Redis stream `lens:prefs` (field `record`),
read by the consumer group `trainers` and capped with `XADD ... MAXLEN ~`. Working contexts travel
as run-length span specs; `tiling_from_spec` turns a spec back into a block-granularity `Tiling`
when it covers the whole lifetime (the only kind LensNet scores and the trainer learns from)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping

from google.protobuf.message import DecodeError
from redis.asyncio import Redis

from lens_serve.core.context import RECALL, Tiling, Unit, WorkingContext
from lens_serve.v1 import lens_serve_pb2 as pb

logger = logging.getLogger(__name__)

PREFS_STREAM = "lens:prefs"
PREFS_GROUP = "trainers"
RECORD_FIELD = "record"
# Enough for hours of shadow records at typical rates while bounding Redis memory (a record's size
# follows the budget, not the session: tens of KB at W = 1024, a few GB at the cap); the cap is
# approximate (`~`) so Redis trims whole macro-nodes cheaply.
DEFAULT_MAXLEN = 100_000


def spec_from_tiling(tiling: Tiling) -> pb.WorkingContextSpec:
    """Run-length spans (start, end, lod) of a whole-lifetime tiling, trailing partial included;
    recalled blocks are spans of their own, flagged."""
    spans: list[tuple[int, int, int, bool]] = []
    for unit in tiling.units:
        start, end = tiling.unit_span(unit)
        _push(spans, start, end, max(unit[0], 0), unit[0] == RECALL)
    if tiling.loose_start < tiling.lifetime:
        _push(spans, tiling.loose_start, tiling.lifetime, 0, False)
    return _spec(spans)


def spec_from_working_context(wc: WorkingContext) -> pb.WorkingContextSpec:
    """Run-length spans of any working context (also ones that drop old text, like recency)."""
    return _spec([(s.start, s.end, s.lod, s.recalled) for s in wc.spans()])


def _spec(spans: list[tuple[int, int, int, bool]]) -> pb.WorkingContextSpec:
    return pb.WorkingContextSpec(
        spans=[pb.SpanSpec(start=s, end=e, lod=lod, recalled=r) for s, e, lod, r in spans]
    )


def _push(
    spans: list[tuple[int, int, int, bool]], start: int, end: int, lod: int, recalled: bool
) -> None:
    last = spans[-1] if spans else None
    if last is not None and (last[2], last[3]) == (lod, recalled) and last[1] == start:
        spans[-1] = (last[0], end, lod, recalled)
    else:
        spans.append((start, end, lod, recalled))


def tiling_from_spec(
    spec: pb.WorkingContextSpec, lifetime: int, block_size: int, gist_rows: int
) -> Tiling | None:
    """The whole-lifetime tiling a spec describes, or None if it does not start at token 0.

    Raises ValueError for a malformed spec: empty or reversed spans, gaps or overlaps, an end other
    than `lifetime`, a gist span that is not a run of whole aligned tree nodes, or a recalled span
    that is not whole raw blocks older than its place."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    spans: list[tuple[int, int, int]] = []  # the timeline
    recalls: list[tuple[int, int, int]] = []  # (place among `spans`, start, end)
    for s in spec.spans:
        start, end, lod = int(s.start), int(s.end), int(s.lod)
        if start >= end:
            raise ValueError(f"span [{start}, {end}) at LOD{lod} is empty or reversed")
        if s.recalled:
            frontier = spans[-1][1] if spans else 0
            if lod or start % block_size or end % block_size or end > frontier:
                raise ValueError(f"recalled span [{start}, {end}) is not whole older raw blocks")
            recalls.append((len(spans), start, end))
        elif (
            lod == 0
            and spans
            and spans[-1][2] == 0
            and spans[-1][1] == start
            and (not recalls or recalls[-1][0] < len(spans))
        ):
            spans[-1] = (spans[-1][0], end, 0)  # one raw run, however the writer split it
        else:
            spans.append((start, end, lod))
    if not spans:
        if lifetime:
            return None  # covers nothing: a degenerate "drop everything" context
        return Tiling([], 0, block_size, gist_rows)
    for (_, end, _), (start, _, _) in itertools.pairwise(spans):
        if start != end:
            kind = "gap" if start > end else "overlap"
            raise ValueError(f"spans have a {kind} at token {min(start, end)}")
    if spans[-1][1] != lifetime:
        raise ValueError(f"spans end at {spans[-1][1]}, not at the newest token {lifetime}")
    for start, end, lod in spans:
        if lod == 0:
            continue
        size = block_size**lod
        if start % size or end % size:
            raise ValueError(f"LOD{lod} span [{start}, {end}) is not aligned to {size} tokens")
    if spans[0][0] != 0:
        return None  # a window that dropped old text (recency): evaluation only
    loose_start = lifetime - lifetime % block_size
    units: list[Unit] = []
    for k, (start, end, lod) in enumerate(spans):
        for _, r_start, r_end in (r for r in recalls if r[0] == k):
            units.extend((RECALL, i) for i in range(r_start // block_size, r_end // block_size))
        if lod > 0:
            size = block_size**lod
            units.extend((lod, i) for i in range(start // size, end // size))
            continue
        # Raw spans start on a block boundary (everything before them is whole gists or blocks);
        # the part past the last complete block is the trailing partial block, never a unit.
        if start % block_size:
            raise ValueError(f"raw span [{start}, {end}) does not start on a block boundary")
        stop = min(end, loose_start)
        if end < loose_start and end % block_size:
            raise ValueError(f"raw span [{start}, {end}) ends inside a block")
        units.extend((0, i) for i in range(start // block_size, stop // block_size))
    for _, r_start, r_end in (r for r in recalls if r[0] == len(spans)):
        units.extend((RECALL, i) for i in range(r_start // block_size, r_end // block_size))
    return Tiling(units, lifetime, block_size, gist_rows)


def decode_record(fields: Mapping[bytes | str, bytes | str]) -> pb.PreferenceRecord:
    """The record of one stream entry's fields; ValueError if absent or not a PreferenceRecord."""
    raw = fields.get(RECORD_FIELD.encode(), fields.get(RECORD_FIELD))
    if raw is None:
        raise ValueError(f"stream entry has no {RECORD_FIELD!r} field")
    return parse_record(raw.encode() if isinstance(raw, str) else raw)


def parse_record(raw: bytes) -> pb.PreferenceRecord:
    """A serialized record; ValueError if the bytes are not one (or hold no variant)."""
    record = pb.PreferenceRecord()
    try:
        record.ParseFromString(raw)
    except DecodeError as e:
        raise ValueError(f"not a serialized PreferenceRecord: {e}") from e
    if not record.variants:
        raise ValueError("record has no variants")
    return record


class PreferenceLog:
    """Appends preference records to the stream, capped at about `maxlen` entries."""

    def __init__(
        self, redis: Redis, *, stream: str = PREFS_STREAM, maxlen: int = DEFAULT_MAXLEN
    ) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self._redis = redis
        self.stream = stream
        self.maxlen = maxlen

    async def append(self, record: pb.PreferenceRecord) -> bytes:
        """XADD one record; returns its stream id."""
        entry_id = await self._redis.xadd(
            self.stream,
            {RECORD_FIELD: record.SerializeToString()},
            maxlen=self.maxlen,
            approximate=True,
        )
        return entry_id if isinstance(entry_id, bytes) else entry_id.encode()
