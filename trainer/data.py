"""Reading preference records: the `trainers` consumer group on `lens:prefs`, the durable replay
list, and dump files for offline runs.

Durability: an entry is acknowledged in the same MULTI/EXEC transaction that appends its record to
the Redis list `lens:trainer:replay` (capped at the replay size). Redis runs a transaction whole or
not at all, so at every instant a record is either pending in the group (a dead consumer's entries
are claimed with XAUTOCLAIM once idle) or stored in the replay list (which a restarted trainer
reloads): a trainer killed at any point loses no record. Acknowledging on store, not on publish,
keeps the pending list short while the gate holds publishing back for a long time. Records the
trainer cannot use are acknowledged too, with the reason kept in `lens:trainer:rejected`."""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from lens_serve.store.preferences import PREFS_GROUP, PREFS_STREAM, RECORD_FIELD

logger = logging.getLogger(__name__)

REPLAY_KEY = "lens:trainer:replay"
REJECTED_KEY = "lens:trainer:rejected"
# Reasons kept for operators; old ones are dropped first.
REJECTED_MAX = 1000
DUMP_MAGIC = b"LENSPREFS1\n"
_FRAME = struct.Struct(">I")  # big-endian u32 length prefix


@dataclass(frozen=True)
class Entry:
    entry_id: str
    record: bytes  # a serialized PreferenceRecord (b"" if the entry had no `record` field)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(raw: Iterable[Any]) -> list[Entry]:
    out = []
    for entry_id, fields in raw:
        value = (fields or {}).get(RECORD_FIELD.encode(), (fields or {}).get(RECORD_FIELD, b""))
        out.append(Entry(_text(entry_id), value.encode() if isinstance(value, str) else value))
    return out


def _envelope(entry: Entry) -> bytes:
    return entry.entry_id.encode() + b"\n" + entry.record  # stream ids never hold a newline


def _open_envelope(raw: bytes) -> Entry:
    entry_id, _, record = raw.partition(b"\n")
    return Entry(entry_id.decode(), record)


class PreferenceConsumer:
    """One consumer of the `trainers` group."""

    def __init__(
        self,
        redis: Redis,
        consumer: str,
        *,
        claim_idle_ms: int,
        replay_size: int,
        stream: str = PREFS_STREAM,
        group: str = PREFS_GROUP,
    ) -> None:
        self._redis = redis
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.replay_size = replay_size
        self.stream = stream
        self.group = group
        self._claim_cursor = "0-0"

    async def ensure_group(self) -> None:
        """Create the group at the stream's start (and the stream) unless it exists."""
        try:
            await self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            logger.info("created consumer group %s on %s", self.group, self.stream)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def claim(self, count: int) -> list[Entry]:
        """Take over up to `count` entries pending longer than claim_idle_ms (dead consumers).

        The scan resumes where the last call stopped, so repeated calls walk the whole pending
        list. Entries trimmed from the stream meanwhile are dropped from it by Redis (7+)."""
        reply = await self._redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id=self._claim_cursor,
            count=count,
        )
        self._claim_cursor = _text(reply[0])
        claimed = _entries(reply[1])
        deleted = reply[2] if len(reply) > 2 else []
        if claimed:
            logger.info("claimed %d entries left pending by another consumer", len(claimed))
        if deleted:
            logger.warning("%d pending entries were trimmed from the stream", len(deleted))
        return claimed

    async def read(self, count: int, block_ms: int | None) -> list[Entry]:
        """New entries for this consumer (waits up to block_ms when there are none)."""
        reply = await self._redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms
        )
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3 answers a map
            return [e for raw in reply.values() for e in _entries(raw[0] if raw else [])]
        return [e for _, raw in reply for e in _entries(raw)]

    async def commit(self, kept: list[Entry], rejected: list[tuple[Entry, str]]) -> None:
        """Store `kept` in the replay list, note `rejected`, and ACK all, atomically."""
        ids = [e.entry_id for e in kept] + [e.entry_id for e, _ in rejected]
        if not ids:
            return
        async with self._redis.pipeline(transaction=True) as tx:
            if kept:
                tx.rpush(REPLAY_KEY, *[_envelope(e) for e in kept])
                tx.ltrim(REPLAY_KEY, -self.replay_size, -1)
            if rejected:
                notes = [json.dumps({"id": e.entry_id, "reason": why}) for e, why in rejected]
                tx.lpush(REJECTED_KEY, *notes)
                tx.ltrim(REJECTED_KEY, 0, REJECTED_MAX - 1)
            tx.xack(self.stream, self.group, *ids)
            await tx.execute()

    async def replay(self) -> list[Entry]:
        """The stored records, oldest first."""
        raw = await self._redis.lrange(REPLAY_KEY, 0, -1)
        return [_open_envelope(r if isinstance(r, bytes) else r.encode()) for r in raw]

    async def pending(self) -> int:
        """Entries delivered to this consumer and not acknowledged."""
        rows = await self._redis.xpending_range(
            self.stream, self.group, min="-", max="+", count=1, consumername=self.consumer
        )
        return len(rows)

    async def lag(self) -> int:
        """Entries of the stream the group has not acknowledged: never delivered (the group's
        `lag`) plus delivered and pending. Redis answers no lag after some trims and deletions
        (then only the pending ones count); 0 if the group does not exist yet."""
        for group in await self._redis.xinfo_groups(self.stream):
            if _text(group["name"]) == self.group:
                return int(group.get("lag") or 0) + int(group["pending"])
        return 0

    async def leave(self) -> None:
        """Remove this consumer from the group if it holds nothing pending (a clean exit)."""
        if await self.pending() == 0:
            await self._redis.xgroup_delconsumer(self.stream, self.group, self.consumer)


async def stream_entries(
    redis: Redis, stream: str = PREFS_STREAM, chunk: int = 500
) -> AsyncIterator[Entry]:
    """Every entry of the stream, oldest first (XRANGE in chunks)."""
    start = "-"
    while True:
        raw = await redis.xrange(stream, min=start, max="+", count=chunk)
        if not raw:
            return
        for entry in _entries(raw):
            yield entry
        start = "(" + _text(raw[-1][0] or "")


def write_dump(path: Path, entries: Iterable[Entry]) -> int:
    """Write entries as length-prefixed (id, record) frames; atomic (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with tmp.open("wb") as f:
        f.write(DUMP_MAGIC)
        for entry in entries:
            entry_id = entry.entry_id.encode()
            f.write(_FRAME.pack(len(entry_id)) + entry_id)
            f.write(_FRAME.pack(len(entry.record)) + entry.record)
            count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return count


def read_dump(path: Path) -> list[Entry]:
    data = path.read_bytes()
    if not data.startswith(DUMP_MAGIC):
        raise ValueError(f"{path}: not a lens-trainer dump (bad magic)")
    out = []
    pos = len(DUMP_MAGIC)
    while pos < len(data):
        fields = []
        for _ in range(2):
            if pos + _FRAME.size > len(data):
                raise ValueError(f"{path}: truncated at byte {pos}")
            (size,) = _FRAME.unpack_from(data, pos)
            pos += _FRAME.size
            if pos + size > len(data):
                raise ValueError(f"{path}: truncated at byte {pos}")
            fields.append(data[pos : pos + size])
            pos += size
        out.append(Entry(fields[0].decode(), fields[1]))
    return out


async def dump(redis: Redis, path: Path, stream: str = PREFS_STREAM) -> int:
    entries = [e async for e in stream_entries(redis, stream)]
    return write_dump(path, entries)
