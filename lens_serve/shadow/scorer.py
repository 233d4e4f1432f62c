"""Shadow scoring: measure, off the request path, how good other working contexts would have been.

A sampled request leaves a job in a bounded queue; a background worker scores the target tokens
(the completion, or the prompt's last tokens held out) after the served working context and after
the served tiling with one unit changed at a time (see `counterfactual`): the units the retrieval
prior and LensNet point at and a few at random. It also scores the baseline policies (and, for
comparison, random multi-edit variants). The served WC goes to the vLLM engine first, at low
priority, then all the others at once: they batch, and read the served prefix from the cache. The
record carries LensNet's inputs for the served tiling and the per-unit gains, not the lifetime, so
its size is bounded by the budget however long the session is. Serving never waits for this: a full
queue or an unreachable Redis drops the job and counts it."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from redis.exceptions import RedisError

from lens_serve import log, metrics, tracing
from lens_serve.core.allocator import lens_scores
from lens_serve.core.assembly import assemble
from lens_serve.core.context import Tiling, WorkingContext, coarsest_tiling, fill_newest_first
from lens_serve.core.counterfactual import UnitChoice, UnitEdit, unit_edits, unit_relevance
from lens_serve.core.lensnet import default_query, score_units, tiling_query_match, unit_inputs
from lens_serve.core.retrieval import prior_scores, retrieved_blocks
from lens_serve.core.sampler import sample_variant
from lens_serve.core.tree import LifetimeTree
from lens_serve.engine.protocol import Engine
from lens_serve.shadow.jobs import ShadowJob
from lens_serve.store.preferences import PreferenceLog, spec_from_tiling, spec_from_working_context
from lens_serve.store.record_units import encode_units
from lens_serve.v1 import lens_serve_pb2 as pb

logger = logging.getLogger(__name__)

# Lower runs first in vLLM's priority scheduler: user requests use 0.
SHADOW_PRIORITY = 10
BASELINES = ("uniform", "recency", "retrieval", "full")


class RecordTooLarge(Exception):
    """A record over ShadowConfig.max_record_bytes (dropped and counted, never written)."""


@dataclass(frozen=True)
class ShadowConfig:
    rate: float = 0.0
    """Fraction of requests sampled."""
    queue_size: int = 64
    """Jobs waiting at most; more are dropped (serving never waits)."""
    units: UnitChoice = field(default_factory=UnitChoice)
    """Units of the served tiling measured one at a time, and how they are picked."""
    random_variants: int = 0
    """Random multi-edit variants of the served tiling, measured for comparison only (the trainer
    learns from the per-unit gains)."""
    edits_per_variant: int = 2
    """Random edits per random variant."""
    guided_share: float = 0.5
    """Share of each random edit's probability that follows the units' query match."""
    max_record_bytes: int = 256 * 1024
    """Larger records are dropped and counted. Records of `tokens` gists stay far below it (their
    content is token ids, at most the budget's rows); other gist kinds store a float16 vector per
    gist and can reach it with large budgets and wide models."""
    seed: int = 0
    """Seeds both the sampling of requests and the unit and variant samplers."""


@dataclass(frozen=True)
class _Plan:
    """What one job measures: the served WC first, then the rest (kind, wc, spec, edit probs)."""

    units: list[pb.UnitInput]
    edits: list[UnitEdit]
    variants: list[tuple[str, WorkingContext, pb.WorkingContextSpec, list[float]]]


class ShadowScorer:
    def __init__(
        self,
        engine: Engine,
        log: PreferenceLog,
        config: ShadowConfig,
        model: str,
        make_tree: Callable[[np.ndarray], LifetimeTree],
    ) -> None:
        self._engine = engine
        self._make_tree = make_tree
        self._log = log
        self._config = config
        self._model = model
        self._sample = random.Random(config.seed)
        self._queue: asyncio.Queue[ShadowJob] = asyncio.Queue(maxsize=config.queue_size)
        self.recorded = 0

    def wants(self) -> bool:
        """Sample this request? (Decided before any work is done for the job.)"""
        return self._config.rate > 0 and self._sample.random() < self._config.rate

    def submit(self, job: ShadowJob) -> None:
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            metrics.SHADOW_JOBS_DROPPED_TOTAL.labels("queue_full").inc()

    async def run(self) -> None:
        """The background worker (one task): jobs one at a time, never raising."""
        while True:
            job = await self._queue.get()
            # The job's log lines name the request it shadows.
            with (
                log.request_context(job.request_id, job.session_id),
                tracing.span("shadow", parent=job.trace, policy=job.policy),
            ):
                await self._run_job(job)

    async def _run_job(self, job: ShadowJob) -> None:
        try:
            record = await self.measure(job)
            await self._log.append(record)
            self.recorded += 1
        except RecordTooLarge as e:
            metrics.SHADOW_JOBS_DROPPED_TOTAL.labels("too_large").inc()
            logger.warning("shadow record for %s dropped: %s", job.request_id, e)
        except RedisError as e:
            metrics.SHADOW_JOBS_DROPPED_TOTAL.labels("redis").inc()
            logger.warning("shadow record for %s dropped: Redis: %s", job.request_id, e)
        except Exception:
            metrics.SHADOW_JOBS_DROPPED_TOTAL.labels("error").inc()
            logger.exception("shadow job for %s failed", job.request_id)
        finally:
            self._queue.task_done()

    async def drain(self) -> None:
        """Wait until every queued job is done (tests and benchmarks)."""
        await self._queue.join()

    async def measure(self, job: ShadowJob) -> pb.PreferenceRecord:
        seed = self._sample.getrandbits(32)
        # A private tree over the recorded lifetime: the session's own tree may grow meanwhile,
        # and equal tokens + GistNet give equal gists, so this is exactly what was served.
        tree = await asyncio.to_thread(self._make_tree, job.lifetime_tokens)
        plan = await asyncio.to_thread(self._plan, job, tree, seed)
        contexts = [wc for _, wc, _, _ in plan.variants]
        contexts += [e.tiling.to_working_context("lens") for e in plan.edits]
        # The served WC first, so that its rows are in the prefix cache; then the rest at once:
        # vLLM batches them, and each recomputes only the rows after its first change.
        first = await self._nll(tree, contexts[0], job.target_ids)
        rest = await asyncio.gather(*(self._nll(tree, wc, job.target_ids) for wc in contexts[1:]))
        nlls = [first, *rest]
        record = pb.PreferenceRecord(
            model=self._model,
            gistnet_version=tree.gistnet_version,
            lens_version=job.chooser.lens_version,
            block_size=tree.block_size,
            gist_rows=tree.gist_rows,
            tail=job.tail,
            budget=job.budget,
            target_token_ids=job.target_ids,
            created_at_ms=int(time.time() * 1e3),
            request_id=job.request_id,
            seed=seed,
            session_id=job.session_id,
            query_token_ids=[] if job.query is None else job.query.tolist(),
            lifetime=tree.lifetime,
            units=plan.units,
        )
        for (kind, _, spec, probs), nll in zip(plan.variants, nlls, strict=False):
            record.variants.append(
                pb.ShadowVariant(
                    spec=spec,
                    mean_nll=sum(nll) / len(nll),
                    kind=kind,
                    log_prob=float(np.log(probs).sum()) if probs else 0.0,
                    edit_probs=probs,
                    token_nll=nll,
                )
            )
        for edit, nll in zip(plan.edits, nlls[len(plan.variants) :], strict=True):
            record.unit_gains.append(
                pb.UnitGain(
                    unit=edit.position,
                    edit=edit.edit,
                    source=edit.source,
                    probability=edit.probability,
                    mean_nll=sum(nll) / len(nll),
                    funding_collapses=edit.funding,
                )
            )
        size = record.ByteSize()
        if size > self._config.max_record_bytes:
            raise RecordTooLarge(f"{size} bytes > max_record_bytes {self._config.max_record_bytes}")
        return record

    async def _nll(self, tree: LifetimeTree, wc: WorkingContext, target: list[int]) -> list[float]:
        """Per-token NLL of `target` after `wc`, nats."""
        embeds = await asyncio.to_thread(assemble, tree, wc)
        logprobs = await self._engine.score(
            embeds, target, f"shadow-{uuid.uuid4().hex}", priority=SHADOW_PRIORITY
        )
        return [-lp for lp in logprobs]

    def _plan(self, job: ShadowJob, tree: LifetimeTree, seed: int) -> _Plan:
        n, budget, tail = tree.lifetime, job.budget, job.tail
        served, tiling = job.served, job.served_tiling
        if served is None:  # the target was held out of the prompt: choose over what remains
            choice = job.chooser.choose(tree, job.policy, budget, tail, query=job.query)
            served = choice.working_context
            tiling = choice.focus.tiling if choice.focus is not None else None
        variants: list[tuple[str, WorkingContext, pb.WorkingContextSpec, list[float]]] = [
            ("served", served, spec_from_working_context(served), [])
        ]
        rng = np.random.default_rng(seed)
        counts = [tree.node_count(k) for k in range(tree.levels + 1)]
        units: list[pb.UnitInput] = []
        edits: list[UnitEdit] = []
        if tiling is not None:  # only a tiling has units to change (the lens policy serves one)
            units, edits = self._unit_edits(job, tree, tiling, counts, rng)
        base = tiling or fill_newest_first(
            coarsest_tiling(n, tail, tree.levels, tree.block_size, tree.gist_rows, tree.frame_rows),
            budget,
        )
        seen = {served.signature()}
        guide = tiling_query_match(tree, base, job.query)  # (U,) explore where the query points
        for _ in range(self._config.random_variants):
            variant = sample_variant(
                base,
                budget,
                tail,
                counts,
                rng,
                self._config.edits_per_variant,
                guide=guide,
                guided_share=self._config.guided_share,
            )
            wc = variant.tiling.to_working_context("random")
            if wc.signature() in seen:
                continue  # an identical variant adds no information
            seen.add(wc.signature())
            probs = [e.probability for e in variant.edits]
            variants.append(("random", wc, spec_from_tiling(variant.tiling), probs))
        for policy in BASELINES:
            if policy == job.policy or (policy == "full" and n > budget):
                continue
            wc = job.chooser.choose(tree, policy, budget, tail, query=job.query).working_context
            variants.append((policy, wc, spec_from_working_context(wc), []))
        return _Plan(units, edits, variants)

    def _unit_edits(
        self,
        job: ShadowJob,
        tree: LifetimeTree,
        tiling: Tiling,
        counts: list[int],
        rng: np.random.Generator,
    ) -> tuple[list[pb.UnitInput], list[UnitEdit]]:
        """LensNet's inputs for the served tiling, and the one-unit changes to measure."""
        words = default_query(tree) if job.query is None else job.query
        blocks = retrieved_blocks(tree, words, job.tail, job.chooser.retrieval)
        prior = prior_scores(tiling, blocks)  # (U,)
        inputs = unit_inputs(tree, tiling, job.tail, job.query)  # U' = units (+ partial block)
        residual = score_units(job.chooser.lensnet, inputs)[: len(prior)]  # (U,)
        lens = lens_scores(prior, residual, job.chooser.focus)  # (U,)
        relevance = unit_relevance(tiling, tree.index.bm25(words))  # (U,)
        edits = unit_edits(
            tiling, job.budget, job.tail, counts, relevance, lens, self._config.units, rng
        )
        return encode_units(tree, tiling, inputs, prior), edits
