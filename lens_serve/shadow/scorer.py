"""Shadow scoring: measure, off the request path, how good other working contexts would have been.

A sampled request leaves a job in a bounded queue; a background worker scores the target tokens
(the completion, or the prompt's last tokens held out) after the served working context, after
random edits of it (with their sampling probabilities) and after the baseline policies, all through
the same vLLM engine at low priority, and appends one self-contained `PreferenceRecord` to Redis.
Serving never waits for this: a full queue or an unreachable Redis drops the job and counts it."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from redis.exceptions import RedisError

from lens_serve import log, metrics, tracing
from lens_serve.core.assembly import assemble
from lens_serve.core.context import WorkingContext, coarsest_tiling, fill_newest_first
from lens_serve.core.lensnet import tiling_query_match
from lens_serve.core.sampler import sample_variant
from lens_serve.core.tree import LifetimeTree
from lens_serve.engine.protocol import Engine
from lens_serve.shadow.jobs import ShadowJob
from lens_serve.store.preferences import PreferenceLog, spec_from_tiling, spec_from_working_context
from lens_serve.v1 import lens_serve_pb2 as pb

logger = logging.getLogger(__name__)

# Lower runs first in vLLM's priority scheduler: user requests use 0.
SHADOW_PRIORITY = 10
BASELINES = ("uniform", "recency", "retrieval", "full")


@dataclass(frozen=True)
class ShadowConfig:
    rate: float = 0.0
    """Fraction of requests sampled."""
    queue_size: int = 64
    """Jobs waiting at most; more are dropped (serving never waits)."""
    random_variants: int = 4
    """Random edits of the served working context measured per job."""
    edits_per_variant: int = 2
    """Random edits per variant."""
    guided_share: float = 0.5
    """Share of each edit's probability that follows the units' query match (see `sampler`)."""
    max_lifetime: int = 65_536
    """Longer lifetimes are not sampled: a record carries the whole lifetime."""
    seed: int = 0
    """Seeds both the sampling of requests and the variant sampler."""


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

    def wants(self, lifetime: int) -> bool:
        """Sample this request? (Decided before any work is done for the job.)"""
        if self._config.rate <= 0 or lifetime > self._config.max_lifetime:
            return False
        return self._sample.random() < self._config.rate

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
        variants = await asyncio.to_thread(self._variants, job, tree, seed)
        record = pb.PreferenceRecord(
            model=self._model,
            gistnet_version=tree.gistnet_version,
            lens_version=job.chooser.lens_version,
            block_size=tree.block_size,
            gist_rows=tree.gist_rows,
            tail=job.tail,
            budget=job.budget,
            lifetime_token_ids=job.lifetime_tokens.tolist(),
            window_start=0,
            target_token_ids=job.target_ids,
            created_at_ms=int(time.time() * 1e3),
            request_id=job.request_id,
            seed=seed,
            session_id=job.session_id,
            query_token_ids=[] if job.query is None else job.query.tolist(),
        )
        for kind, wc, spec, probs in variants:
            embeds = await asyncio.to_thread(assemble, tree, wc)
            logprobs = await self._engine.score(
                embeds, job.target_ids, f"shadow-{uuid.uuid4().hex}", priority=SHADOW_PRIORITY
            )
            nll = [-lp for lp in logprobs]
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
        return record

    def _variants(
        self, job: ShadowJob, tree: LifetimeTree, seed: int
    ) -> list[tuple[str, WorkingContext, pb.WorkingContextSpec, list[float]]]:
        """(kind, wc, spec, edit probabilities): served first, then random edits, then baselines."""
        n, budget, tail = tree.lifetime, job.budget, job.tail
        served, base = job.served, job.served_tiling
        if served is None:  # the target was held out of the prompt: choose over what remains
            choice = job.chooser.choose(tree, job.policy, budget, tail, query=job.query)
            served = choice.working_context
            base = choice.focus.tiling if choice.focus is not None else None
        out: list[tuple[str, WorkingContext, pb.WorkingContextSpec, list[float]]] = [
            ("served", served, spec_from_working_context(served), [])
        ]
        base = base or fill_newest_first(
            coarsest_tiling(n, tail, tree.levels, tree.block_size, tree.gist_rows, tree.frame_rows),
            budget,
        )
        counts = [tree.node_count(k) for k in range(tree.levels + 1)]
        rng = np.random.default_rng(seed)
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
            out.append(("random", wc, spec_from_tiling(variant.tiling), probs))
        for policy in BASELINES:
            if policy == job.policy or (policy == "full" and n > budget):
                continue
            wc = job.chooser.choose(tree, policy, budget, tail, query=job.query).working_context
            out.append((policy, wc, spec_from_working_context(wc), []))
        return out
