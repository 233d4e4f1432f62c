"""The trainer's run loop: hold the lock, resume from `lens:current`, ingest records, train, gate,
publish.

Online: wait for the lock (one active trainer), resume from the version `lens:current` names (else
the seeded initial LensNet), reload the durable replay list, then repeat: claim entries a dead
consumer left pending, read new ones, decode and store them (see trainer.data for the ack rule),
and once `min_records` usable records are held take one step on a random batch of training
records. Every `steps_per_version` steps the gate compares the trained LensNet with the current
one on the held-out records; if it passes, the weights are published and `lens:current` is
switched under the lock's fence, and exactly one line `published <version>` goes to stdout.
A stop request (SIGTERM/SIGINT) ends the loop between steps; the lock is always released.

Offline (`offline_dump`): train on a dump file, report the gate's verdict as one `report <json>`
line, and publish only when a Redis URL is given and the gate passes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import json
import logging
import math
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
from redis.asyncio import Redis

from lens_serve.aio import cancel_and_wait
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.lensnet import LensNet, LensNetConfig
from lens_serve.errors import NotFound
from lens_serve.store.preferences import parse_record
from lens_serve.store.registry import LENSNET, WeightsRejected, verify_lensnet
from trainer import metrics as trainer_metrics
from trainer.config import TrainerSettings
from trainer.data import Entry, PreferenceConsumer, read_dump
from trainer.examples import Example, TargetConfig, example_from_record
from trainer.gate import GateDecision, decide, evaluate, is_held_out
from trainer.lock import LockLost, TrainerLock
from trainer.train import PreferenceTrainer, collate

logger = logging.getLogger(__name__)

# How long one XREADGROUP waits while there is too little data to train: short enough that a stop
# request is answered within about a second.
_IDLE_BLOCK_MS = 1000
# The consumer-lag gauge is refreshed (one XINFO GROUPS) at most this often.
_LAG_EVERY_S = 5.0


class ReplayBuffer:
    """The newest `size` decoded records (mirrors `lens:trainer:replay`), split by stream id."""

    def __init__(self, size: int, held_out_every: int) -> None:
        self._items: collections.deque[tuple[bool, Example]] = collections.deque(maxlen=size)
        self._ids: set[str] = set()
        self.held_out_every = held_out_every

    def add(self, example: Example) -> bool:
        """Keep `example` (False if already held: a record claimed or replayed twice)."""
        if example.entry_id in self._ids:
            return False
        if len(self._items) == self._items.maxlen:
            self._ids.discard(self._items[0][1].entry_id)
        self._items.append((is_held_out(example.entry_id, self.held_out_every), example))
        self._ids.add(example.entry_id)
        return True

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._ids

    @property
    def train(self) -> list[Example]:
        return [ex for held, ex in self._items if not held and ex.labelled]

    @property
    def held_out(self) -> list[Example]:
        return [ex for held, ex in self._items if held]

    def sample(self, rng: np.random.Generator, n: int) -> list[Example]:
        pool = self.train
        picks = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
        return [pool[int(i)] for i in sorted(picks)]


@dataclass
class RunResult:
    steps: int = 0
    published: list[str] = field(default_factory=list)
    records: int = 0
    rejected: int = 0
    last_decision: GateDecision | None = None
    steps_per_s: float = 0.0


class Trainer:
    """One trainer process's state. `redis` may be None only for offline runs."""

    def __init__(
        self,
        settings: TrainerSettings,
        redis: Redis | None,
        table: EmbeddingTable,
        *,
        lens_config: LensNetConfig | None = None,
        out: TextIO | None = None,
        consumer: str | None = None,
    ) -> None:
        self.settings = settings
        self._redis = redis
        self.table = table
        self._lens_config = lens_config or LensNetConfig(
            hidden_size=table.hidden_size, seed=settings.seed
        )
        if self._lens_config.hidden_size != table.hidden_size:
            raise ValueError(
                f"LensNet hidden_size {self._lens_config.hidden_size} != "
                f"the model's {table.hidden_size}"
            )
        self._out = out or sys.stdout
        self._targets: TargetConfig = settings.targets
        self.buffer = ReplayBuffer(settings.replay_size, settings.held_out_every)
        self.rng = np.random.default_rng(settings.seed)
        self.net = LensNet(self._lens_config)
        self.current_net = copy.deepcopy(self.net)
        self.current_version = ""  # "" = nothing published: the initial LensNet
        self._lineage_steps = 0  # steps behind self.net, from the initial LensNet, across runs
        self._current_steps = 0  # steps behind the current version's weights
        self._refusals = 0  # gates in a row that judged the trained weights and refused them
        self._unloadable: set[str] = set()  # published versions this trainer cannot load
        self._lag_at = -math.inf  # when the consumer-lag gauge was last refreshed
        self._trainer = self._new_optimizer()
        self.result = RunResult()
        self._losses: list[float] = []
        self.lock: TrainerLock | None = None
        self.consumer: PreferenceConsumer | None = None
        if redis is not None:
            self.lock = TrainerLock(redis, settings.lock_ttl_ms)
            name = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            self.consumer = PreferenceConsumer(
                redis,
                name,
                claim_idle_ms=settings.claim_idle_ms,
                replay_size=settings.replay_size,
            )

    def _new_optimizer(self) -> PreferenceTrainer:
        s = self.settings
        return PreferenceTrainer(
            self.net,
            lr=s.lr,
            loss=s.loss,
            weight_decay=s.weight_decay,
            grad_clip=s.grad_clip,
            seed=s.seed,
        )

    # -- entry points ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> RunResult:
        stop = stop or asyncio.Event()
        if self.settings.offline_dump is not None:
            return await self._run_offline(stop)
        if self._redis is None or self.lock is None or self.consumer is None:
            raise ValueError("an online trainer needs Redis")
        async with self._holding_lock(stop) as held:
            if not held:
                return self.result
            await self._resume()
            await self.consumer.ensure_group()
            await self._reload_replay()
            await self._online_loop(stop)
        return self.result

    @contextlib.asynccontextmanager
    async def _holding_lock(self, stop: asyncio.Event) -> AsyncIterator[bool]:
        """Acquire the lock (waiting), renew it in the background, always release it."""
        if self.lock is None:
            yield True
            return
        if not await self.lock.acquire(stop):
            yield False
            return
        renewal = asyncio.create_task(self.lock.keep_alive(), name="lens-trainer-lock")
        try:
            yield True
        finally:
            await cancel_and_wait([renewal])
            await self.lock.release()
            if self.consumer is not None:
                with contextlib.suppress(Exception):  # best effort: a clean group listing
                    await self.consumer.leave()

    # -- online ---------------------------------------------------------------------------------

    async def _online_loop(self, stop: asyncio.Event) -> None:
        s = self.settings
        began = time.monotonic()
        next_log = began + s.log_every_s
        run_steps = 0
        while not stop.is_set():
            self._check_lock()
            if s.max_steps and run_steps >= s.max_steps:
                break
            ready = len(self.buffer) >= s.min_records and bool(self.buffer.train)
            await self._ingest(block_ms=None if ready else _IDLE_BLOCK_MS)
            now = time.monotonic()
            if not ready:
                if now >= next_log:
                    logger.info("waiting for records: %d of %d", len(self.buffer), s.min_records)
                    next_log = now + s.log_every_s
                began = now  # steps/s counts training time only
                continue
            await self._step()
            run_steps += 1
            self.result.steps_per_s = run_steps / max(time.monotonic() - began, 1e-9)
            if run_steps % s.steps_per_version == 0:
                await self._gate_and_publish()
            if time.monotonic() >= next_log:
                self._log_progress()
                next_log = time.monotonic() + s.log_every_s
        logger.info("stopping after %d steps", run_steps)

    def _check_lock(self) -> None:
        if self.lock is not None and self.lock.lost.is_set():
            raise LockLost(f"{self.lock.key} was lost; stopping without publishing")

    async def _resume(self) -> None:
        assert self._redis is not None
        version = await LENSNET.current(self._redis)
        if not version:
            logger.info("no current LensNet: starting from the seeded initial %s", self.net.version)
            return
        net, steps = await self._load_current(version)
        if net is None:
            # E.g. published by an older LensNet with other inputs: versions are immutable, so
            # train a new lineage; the gate compares it with the seeded initial, and its first
            # publish replaces the unloadable current version (servers reject it too).
            logger.warning("starting from the seeded initial %s", self.net.version)
            return
        self._adopt(net, version, steps)
        logger.info("resuming from %s (%d steps)", version, self._lineage_steps)

    async def _load_current(self, version: str) -> tuple[LensNet | None, int]:
        """The published `version` and its lineage steps; None if this trainer cannot load it."""
        assert self._redis is not None
        if version in self._unloadable:
            return None, 0
        try:
            published = await LENSNET.fetch(self._redis, version)
            net = await asyncio.to_thread(verify_lensnet, published, self.table.hidden_size)
        except (WeightsRejected, NotFound) as e:
            logger.warning("lens:current %s", e)
            self._unloadable.add(version)
            return None, 0
        return net, int(published.metrics.get("steps") or 0)

    def _adopt(self, net: LensNet, version: str, steps: int) -> None:
        self.net = net
        self.current_net = copy.deepcopy(net)
        self.current_version = version
        self._lineage_steps = self._current_steps = steps
        self._refusals = 0
        self._trainer = self._new_optimizer()

    async def _reload_replay(self) -> None:
        assert self.consumer is not None
        entries = await self.consumer.replay()
        if entries:
            kept, rejected = await asyncio.to_thread(self._decode, entries)
            logger.info(
                "reloaded %d records from the replay list (%d unusable)", len(kept), len(rejected)
            )

    async def _ingest(self, block_ms: int | None) -> None:
        assert self.consumer is not None
        count = self.settings.read_count
        entries = await self.consumer.claim(count)
        entries += await self.consumer.read(count, block_ms if not entries else None)
        if entries:
            kept, rejected = await asyncio.to_thread(self._decode, entries)
            await self.consumer.commit(kept, rejected)
            self.result.rejected += len(rejected)
            trainer_metrics.RECORDS_CONSUMED_TOTAL.labels("usable").inc(len(kept))
            trainer_metrics.RECORDS_CONSUMED_TOTAL.labels("rejected").inc(len(rejected))
        if time.monotonic() - self._lag_at >= _LAG_EVERY_S:
            trainer_metrics.CONSUMER_LAG_RECORDS.set(await self.consumer.lag())
            self._lag_at = time.monotonic()

    def _decode(self, entries: Sequence[Entry]) -> tuple[list[Entry], list[tuple[Entry, str]]]:
        """Decode into the buffer; returns (entries to store, entries rejected with why)."""
        kept: list[Entry] = []
        rejected: list[tuple[Entry, str]] = []
        for entry in entries:
            try:
                record = parse_record(entry.record)
                example = example_from_record(
                    record, entry.entry_id, self.table, self._targets, self.settings.model
                )
            except ValueError as e:  # RecordError included
                logger.warning("skipping record %s: %s", entry.entry_id, e)
                rejected.append((entry, str(e)))
                continue
            kept.append(entry)
            if self.buffer.add(example):
                self.result.records += 1
        return kept, rejected

    async def _step(self) -> None:
        batch = collate(self.buffer.sample(self.rng, self.settings.batch_size))
        metrics = await asyncio.to_thread(self._trainer.step, batch)
        self.result.steps += 1
        self._lineage_steps += 1
        trainer_metrics.STEPS_TOTAL.inc()
        self._losses.append(metrics.loss)
        if not math.isfinite(metrics.loss):
            raise FloatingPointError(f"training loss became {metrics.loss} at step {self.steps}")

    @property
    def steps(self) -> int:
        """Steps behind the trained weights, counted from the initial LensNet."""
        return self._lineage_steps

    def _log_progress(self) -> None:
        recent = self._losses[-self.settings.steps_per_version :]
        logger.info(
            "step %d loss %.4f records %d (held out %d) rejected %d %.1f steps/s",
            self.steps,
            float(np.mean(recent)) if recent else math.nan,
            len(self.buffer),
            len(self.buffer.held_out),
            self.result.rejected,
            self.result.steps_per_s,
        )

    async def _gate_reported(self) -> GateDecision:
        """Run the gate, keep its decision, and write one `report {json}` line on the output for
        it, passed or not (the learning curve)."""
        decision = await asyncio.to_thread(self._gate)
        self.result.last_decision = decision
        outcome = "passed" if decision.passed else "refused" if decision.judged else "unjudged"
        trainer_metrics.GATE_DECISIONS_TOTAL.labels(outcome).inc()
        report = {
            "steps": self.steps,
            "run_steps": self.result.steps,
            "records": len(self.buffer),
            "held_out": len(self.buffer.held_out),
            "steps_per_s": round(self.result.steps_per_s, 2),
            "passed": decision.passed,
            "reason": decision.reason,
            "new": decision.new.as_dict(),
            "current": decision.current.as_dict(),
            "prior": decision.prior.as_dict() if decision.prior is not None else None,
            "current_version": self.current_version,
        }
        self._out.write(f"report {json.dumps(_json_safe(report), sort_keys=True)}\n")
        self._out.flush()
        return decision

    async def _follow_external_pin(self) -> bool:
        """If someone pinned or rolled back `lens:current`, continue from that version."""
        assert self._redis is not None
        version = await LENSNET.current(self._redis)
        if not version or version == self.current_version:
            return False
        net, steps = await self._load_current(version)
        if net is None:
            return False  # nothing to continue from: keep this lineage (logged once)
        logger.warning("lens:current moved to %s outside this trainer: continuing from it", version)
        self._adopt(net, version, steps)
        return True

    async def _gate_and_publish(self) -> None:
        if self._redis is not None and await self._follow_external_pin():
            return
        decision = await self._gate_reported()
        if not decision.passed:
            logger.info("gate refused at step %d: %s", self.steps, decision.reason)
            if decision.judged:
                self._refusals += 1
            limit = self.settings.restart_after_refusals
            if limit and self._refusals >= limit:
                logger.info(
                    "%d refusals in a row: training restarts from %s",
                    self._refusals,
                    self.current_version or "the seeded initial LensNet",
                )
                # _adopt trains on `net` and keeps a copy as current: one copy suffices.
                self._adopt(self.current_net, self.current_version, self._current_steps)
            return
        if self._redis is not None:
            await self._publish(decision)

    def _gate(self) -> GateDecision:
        held = self.buffer.held_out
        loss = self.settings.loss
        new = evaluate(self.net, held, loss)
        current = evaluate(self.current_net, held, loss)
        prior = evaluate(None, held, loss)
        return decide(new, current, prior, self.settings.min_held_out, self.settings.max_drift)

    async def _publish(self, decision: GateDecision) -> None:
        assert self._redis is not None and self.lock is not None
        self._check_lock()
        if self.net.version == self.current_version:
            return
        recent = self._losses[-self.settings.steps_per_version :]
        new, current, prior = decision.new, decision.current, decision.prior
        metrics: dict[str, Any] = {
            "ndcg": new.ndcg,
            "agreement": new.agreement,
            "decisive_pairs": new.decisive_pairs,
            "loss": float(np.mean(recent)) if recent else None,
            "held_out_loss": new.loss,
            "held_out_records": new.records,
            "held_out_ranked_records": new.ranked_records,
            "held_out_units": new.units,
            "current_ndcg": current.ndcg,
            "current_agreement": current.agreement,
            "prior_ndcg": prior.ndcg if prior is not None else None,
            "prior_agreement": prior.agreement if prior is not None else None,
            "steps": self.steps,
            "records": len(self.buffer),
            "parent": self.current_version,
        }
        metrics.update({k: v for k, v in new.as_dict().items() if k.startswith("served_vs_")})
        metrics = {k: _json_safe(v) for k, v in metrics.items()}
        version = await LENSNET.publish(
            self._redis, self.net, metrics=metrics, parent=self.current_version, make_current=False
        )
        await self.lock.set_current(version)
        self.current_net = copy.deepcopy(self.net)
        self.current_version = version
        self._current_steps = self.steps
        self._refusals = 0
        self.result.published.append(version)
        trainer_metrics.PUBLISHED_VERSIONS_TOTAL.inc()
        logger.info(
            "published %s at step %d: held-out NDCG %.3f (was %.3f, prior %.3f), agreement %.3f",
            version,
            self.steps,
            new.ndcg,
            current.ndcg,
            prior.ndcg if prior is not None else math.nan,
            new.agreement,
        )
        self._out.write(f"published {version}\n")
        self._out.flush()

    # -- offline --------------------------------------------------------------------------------

    async def _run_offline(self, stop: asyncio.Event) -> RunResult:
        s = self.settings
        assert s.offline_dump is not None
        entries = read_dump(s.offline_dump)
        await asyncio.to_thread(self._decode, entries)
        logger.info(
            "offline: %d usable records of %d (%d held out)",
            len(self.buffer),
            len(entries),
            len(self.buffer.held_out),
        )
        if not self.buffer.train:
            raise ValueError(f"offline_dump: {s.offline_dump} holds no trainable record")
        async with self._holding_lock(stop) as held:
            if not held:
                return self.result
            if self._redis is not None:
                await self._resume()
            began = time.monotonic()
            total = s.max_steps or s.steps_per_version
            while self.result.steps < total and not stop.is_set():
                await self._step()
            self.result.steps_per_s = self.result.steps / max(time.monotonic() - began, 1e-9)
            decision = await self._gate_reported()
            if decision.passed and self._redis is not None:
                await self._publish(decision)
        return self.result


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (json.dumps would write invalid JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value
