"""LensServe's domain orchestration: sessions, working contexts, generation and scoring.

No gRPC types here: the servicer converts protos to the inputs in `requests` and back. Every
request is validated completely (`validation`) before anything is written, so a bad request never
changes a session. CPU work on trees and LensNet runs in worker threads, never on the event loop.
`composition.build_service` wires one from settings."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lens_serve import log, metrics, tracing
from lens_serve.aio import cancel_and_wait
from lens_serve.core.allocator import FocusState
from lens_serve.core.assembly import assemble
from lens_serve.core.context import levels_for
from lens_serve.core.policies import Choice, ContextChooser
from lens_serve.core.tree import LifetimeTree
from lens_serve.engine.protocol import Engine, GenerationParams
from lens_serve.errors import InvalidRequest
from lens_serve.service.admission import Admission
from lens_serve.service.config import Settings
from lens_serve.service.hot_swap import WeightStore
from lens_serve.service.prewarm import Prewarmer
from lens_serve.service.requests import (
    ContextQuery,
    ContextView,
    GenerateEvent,
    GenerateInput,
    ScoreInput,
    ScoreResult,
    Usage,
)
from lens_serve.service.tree_cache import CachedSession, TreeCache
from lens_serve.service.validation import RequestValidator
from lens_serve.shadow.jobs import build_job
from lens_serve.shadow.scorer import ShadowScorer
from lens_serve.store.sessions import Once, SessionFull, SessionInfo, SessionStore

logger = logging.getLogger(__name__)

SYNC_OVERLAP = 16
"""Tokens of a cached tree re-read from the log on every sync, to notice a log that lost them."""

NEWEST = ContextQuery(None, "newest")
"""The default query: the newest tokens."""

TreeFactory = Callable[[Sequence[int] | np.ndarray], LifetimeTree]
"""Builds a lifetime tree over token ids with this server's GistNet and embedding table."""


@dataclass(frozen=True)
class _Prepared:
    """Everything a request needs from its context, taken under the session lock."""

    embeds: torch.Tensor  # (rows, D)
    view: ContextView
    choice: Choice
    tree: LifetimeTree  # what the choice was made on (positions < its lifetime never change)
    query: ContextQuery


class LensService:
    def __init__(
        self,
        *,
        settings: Settings,
        engine: Engine,
        sessions: SessionStore,
        weights: WeightStore,
        make_tree: TreeFactory,
        gistnet_version: str,
        validator: RequestValidator,
        prewarmer: Prewarmer,
        shadow: ShadowScorer | None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.sessions = sessions
        self.weights = weights
        self.shadow = shadow
        self.gistnet_version = gistnet_version
        self._make_tree = make_tree
        self._validate = validator
        self._prewarmer = prewarmer
        self._admission = Admission(settings.max_concurrency)
        self._trees = TreeCache(settings.tree_cache_bytes)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._tasks: set[asyncio.Task[None]] = set()  # the watcher and the shadow worker

    def start_background(self) -> None:
        """Start the LensNet watcher (hot swap) and the shadow worker; `aclose` stops them."""
        jobs = [self.weights.follow(self.settings.lens_poll_seconds)]
        if self.shadow is not None:
            jobs.append(self.shadow.run())
        for job in jobs:
            task = asyncio.create_task(job)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        await self._prewarmer.aclose()
        await cancel_and_wait(self._tasks)

    async def settle_prewarms(self) -> None:
        """Wait for the next-turn prefills started so far (tests and benchmarks)."""
        await self._prewarmer.settle()

    # -- sessions -------------------------------------------------------------------------------

    async def create_session(self, owner: str) -> SessionInfo:
        return await self.sessions.create(owner)

    async def get_session(self, owner: str, session_id: str) -> tuple[SessionInfo, int]:
        """The session and its number of tree levels."""
        info = await self.sessions.get(self._validate.session_id(session_id), owner)
        return info, levels_for(info.lifetime_tokens, self.settings.block_size)

    async def delete_session(self, owner: str, session_id: str) -> None:
        await self.sessions.delete(self._validate.session_id(session_id), owner)
        self._trees.drop(session_id)

    async def append(
        self,
        owner: str,
        session_id: str,
        parts: Iterable[str | Sequence[int]] | AsyncIterable[str | Sequence[int]],
        idempotency_key: str = "",
    ) -> tuple[int, int]:
        """Append text runs and token-id runs, in order, as one atomic append (consecutive text
        tokenizes as one text). `parts` may be a stream (an Append's chunks): it is read and
        tokenized as it arrives, and refused (`LimitExceeded`) as soon as it exceeds the upload
        limits, with nothing appended. Returns the new lifetime and the tokens appended (by the
        first append under `idempotency_key`: a retry appends nothing)."""
        with log.request_context(uuid.uuid4().hex):
            sid = self._validate.session_id(session_id)
            log.SESSION_ID.set(sid)
            key = self._validate.idempotency_key(idempotency_key)
            # Unknown sessions are refused before their upload is read and tokenized; the append
            # below checks again, atomically.
            info = await self.sessions.get(sid, owner)
            upload = self._validate.upload(self.settings.max_session_tokens - info.lifetime_tokens)
            if isinstance(parts, AsyncIterable):
                async for part in parts:
                    await upload.add(part)
            else:
                for part in parts:
                    await upload.add(part)
            ids = await upload.finish()
            async with self._lock(sid):
                lifetime, applied = await self.sessions.append_once(
                    sid, owner, ids, self._once(key, "append")
                )
            if applied:
                return lifetime, len(ids)
            record = await self.sessions.write_record(sid, owner, key)
            start, end = record.parts["append"] if record else (0, 0)
            return lifetime, end - start

    # -- working contexts -----------------------------------------------------------------------

    async def working_context(
        self,
        owner: str,
        session_id: str,
        wc_budget: int,
        policy: str,
        *,
        query: str = "",
        query_token_ids: Sequence[int] = (),
    ) -> ContextView:
        with log.request_context(uuid.uuid4().hex):
            sid = self._validate.session_id(session_id)
            log.SESSION_ID.set(sid)
            budget, policy = self._validate.budget(wc_budget), self._validate.policy(policy)
            wanted = self._validate.query(query, query_token_ids)
            chooser = self.weights.chooser
            async with self._lock(sid):
                entry = await self._synced(owner, sid)
                self._validate.feasible(entry.tree.lifetime, budget, policy)
                prepared = await self._prepare(
                    chooser,
                    entry.tree,
                    policy=policy,
                    budget=budget,
                    focus=entry.focus,
                    query=wanted,
                )
            return prepared.view

    # -- generation -----------------------------------------------------------------------------

    async def generate(
        self, owner: str, request: GenerateInput
    ) -> AsyncGenerator[GenerateEvent, None]:
        arrived = time.monotonic()
        request_id = uuid.uuid4().hex
        with log.request_context(request_id):
            prompt = self._validate.prompt_ids(request)
            budget, policy = (
                self._validate.budget(request.wc_budget),
                self._validate.policy(request.policy),
            )
            params = self._validate.params(request.sampling, budget)
            chooser = self.weights.chooser  # the whole request runs on this LensNet version
            sid = self._validate.session_id(request.session_id) if request.session_id else ""
            log.SESSION_ID.set(sid)
            seed = request.sampling.seed
            # Without a session nothing is written, so a retry is safe without a key.
            key = self._validate.idempotency_key(request.idempotency_key) if sid else ""
            if key:
                replay = await self._replay(owner, sid, key, policy)
                if replay is not None:
                    yield replay
                    return
            with self._admission.slot():
                if sid:
                    query = self._validate.prompt_query(request, prompt)
                    prepared = await self._prepare_turn(
                        owner, sid, prompt, budget=budget, policy=policy, params=params,
                        chooser=chooser, seed=seed, query=query, key=key,
                    )  # fmt: skip
                else:  # the prompt is the whole context: what do its newest tokens do?
                    self._validate.feasible(len(prompt), budget, policy)
                    tree = await asyncio.to_thread(self._make_tree, prompt)
                    prepared = await self._prepare(
                        chooser, tree, policy=policy, budget=budget, seed=seed, served=True
                    )
                completion: list[int] = []
                cached_rows = 0
                first_token_at = 0.0
                metrics.PROMPT_TOKENS_TOTAL.inc(len(prompt))
                with tracing.span("engine", rows=prepared.view.working_context.rows):
                    async for chunk in self.engine.generate(prepared.embeds, params, request_id):
                        if not completion and chunk.token_ids:
                            first_token_at = time.monotonic()
                            metrics.TIME_TO_FIRST_TOKEN_SECONDS.observe(first_token_at - arrived)
                        completion += chunk.token_ids
                        metrics.GENERATION_TOKENS_TOTAL.inc(len(chunk.token_ids))
                        cached_rows = max(cached_rows, chunk.cached_rows)
                        if chunk.finish_reason is None:
                            yield GenerateEvent(
                                request_id, chunk.text, chunk.token_ids, logprobs=chunk.logprobs
                            )
                            continue
                        if sid and completion:
                            once = self._once(key, "answer", chunk.finish_reason)
                            async with self._lock(sid):
                                await self.sessions.append(sid, owner, completion, once)
                            if self.settings.prewarm_next_turn:
                                self._prewarmer.schedule(
                                    self._next_turn_rows(
                                        owner, sid, prepared, prompt, completion, chooser
                                    )
                                )
                        self._maybe_shadow(
                            request_id, sid, policy, prepared, prompt, completion, chooser
                        )
                        metrics.WC_CACHED_ROWS_TOTAL.inc(cached_rows)
                        if len(completion) > 1:  # the first token's wait is TTFT's
                            tpot = (time.monotonic() - first_token_at) / (len(completion) - 1)
                            metrics.TIME_PER_OUTPUT_TOKEN_SECONDS.observe(tpot)
                        wc = prepared.view.working_context
                        usage = Usage(
                            lifetime_tokens=wc.lifetime,
                            wc_rows=wc.rows,
                            gist_covered_tokens=wc.gist_covered_tokens,
                            lens_version=wc.lens_version,
                            wc_choice_ms=prepared.view.choice_ms,
                            completion_tokens=len(completion),
                            cached_rows=cached_rows,
                            prompt_tokens=len(prompt),
                            policy=policy,
                            gistnet_version=prepared.view.gistnet_version,
                            query_source=prepared.view.query_source,
                            query_tokens=prepared.view.query_tokens,
                        )
                        yield GenerateEvent(
                            request_id, chunk.text, chunk.token_ids, chunk.finish_reason, usage,
                            chunk.logprobs, prepared.view,
                        )  # fmt: skip

    async def _prepare_turn(
        self,
        owner: str,
        sid: str,
        prompt: list[int],
        *,
        budget: int,
        policy: str,
        params: GenerationParams,
        chooser: ContextChooser,
        seed: int,
        query: ContextQuery,
        key: str,
    ) -> _Prepared:
        """Check, append the prompt to the session (once per idempotency `key`), and choose its
        working context."""
        async with self._lock(sid):
            info = await self.sessions.get(sid, owner)
            lifetime = info.lifetime_tokens + len(prompt)
            self._validate.feasible(lifetime, budget, policy)
            limit = self.settings.max_session_tokens
            if lifetime + params.max_tokens > limit:  # refuse now, not after generating
                raise SessionFull(sid, info.lifetime_tokens, len(prompt) + params.max_tokens, limit)
            await self.sessions.append(sid, owner, prompt, self._once(key, "prompt"))
            entry = await self._synced(owner, sid)
            prepared = await self._prepare(
                chooser, entry.tree, policy=policy, budget=budget, seed=seed, focus=entry.focus,
                query=query, served=True,
            )  # fmt: skip
            if prepared.choice.focus is not None:
                entry.focus = prepared.choice.focus  # the session's next turn continues from here
            return prepared

    def _once(self, key: str, part: str, finish_reason: str = "") -> Once | None:
        return Once(key, part, self.settings.idempotency_ttl_s, finish_reason) if key else None

    async def _replay(self, owner: str, sid: str, key: str, policy: str) -> GenerateEvent | None:
        """The stored answer of a turn that an earlier request with idempotency `key` completed
        (its reply was lost), as one final event; None if that turn has no stored answer."""
        record = await self.sessions.write_record(sid, owner, key)
        if record is None or "answer" not in record.parts:
            return None
        start, end = record.parts["answer"]
        answer = (await self.sessions.tokens(sid, owner, start=start))[: end - start].tolist()
        prompt_start, prompt_end = record.parts.get("prompt", (start, start))
        usage = Usage(
            lifetime_tokens=prompt_end, wc_rows=0, gist_covered_tokens=0, lens_version="",
            wc_choice_ms=0.0, completion_tokens=len(answer), cached_rows=0,
            prompt_tokens=prompt_end - prompt_start, policy=policy, gistnet_version="",
            query_source="", query_tokens=0, replayed=True,
        )  # fmt: skip
        text = self.engine.decode(answer)
        return GenerateEvent(uuid.uuid4().hex, text, answer, record.finish_reason, usage)

    async def _next_turn_rows(
        self,
        owner: str,
        sid: str,
        prepared: _Prepared,
        prompt: list[int],
        completion: list[int],
        chooser: ContextChooser,
    ) -> torch.Tensor | None:
        """The rows (rows, D) a session's next turn will start with: this turn's WC and its answer,
        or, under `lens` when the next turn's new tokens (taken to be as many as this prompt's)
        would not fit, the WC refit now, which becomes the session's state. None: another turn
        came first."""
        answer_rows = prepared.tree.table(torch.tensor(completion))  # (answer, D)
        focus = prepared.choice.focus
        if focus is None:
            return torch.cat([prepared.embeds, answer_rows])
        async with self._lock(sid):
            entry = await self._synced(owner, sid)
            if entry.focus is not focus:
                return None
            budget, tail = prepared.view.budget, self.settings.tail
            refit = await asyncio.to_thread(
                chooser.anticipate, entry.tree, budget, tail, focus, len(prompt)
            )
            if refit is None:
                return torch.cat([prepared.embeds, answer_rows])
            entry.focus = refit
            wc = refit.tiling.to_working_context("lens", chooser.lens_version)
            return await asyncio.to_thread(assemble, entry.tree, wc)

    def _maybe_shadow(
        self,
        request_id: str,
        sid: str,
        policy: str,
        prepared: _Prepared,
        prompt: list[int],
        completion: list[int],
        chooser: ContextChooser,
    ) -> None:
        """Leave a shadow job for a sampled request (cheap; the work happens in the background)."""
        wc = prepared.view.working_context
        if self.shadow is None or not self.shadow.wants():
            return
        job = build_job(
            request_id=request_id,
            session_id=sid,
            policy=policy,
            tree=prepared.tree,
            served=wc,
            served_tiling=prepared.choice.focus.tiling if prepared.choice.focus else None,
            prompt=prompt,
            completion=completion,
            budget=prepared.view.budget,
            tail=self.settings.tail,
            chooser=chooser,
            target=self.settings.shadow_target,
            target_tokens=self.settings.shadow_target_tokens,
            query=prepared.query.token_ids,
        )
        if job is not None:
            self.shadow.submit(job)

    # -- scoring --------------------------------------------------------------------------------

    async def score(self, owner: str, request: ScoreInput) -> ScoreResult:
        request_id = uuid.uuid4().hex
        with log.request_context(request_id):
            v = self._validate
            context = v.text_or_ids(request.context, request.context_token_ids, "context")
            target = v.text_or_ids(
                request.continuation, request.continuation_token_ids, "continuation"
            )
            if not target:
                raise InvalidRequest("continuation", "must not be empty")
            budget, policy = v.budget(request.wc_budget), v.policy(request.policy)
            query = v.query(request.query, request.query_token_ids)
            if budget + len(target) > self.engine.max_model_len:
                raise InvalidRequest(
                    "continuation",
                    f"{len(target)} tokens after a {budget}-row context exceed the model's "
                    f"{self.engine.max_model_len} positions",
                )
            chooser = self.weights.chooser
            with self._admission.slot():
                if request.session_id:
                    sid = v.session_id(request.session_id)
                    log.SESSION_ID.set(sid)
                    async with self._lock(sid):
                        entry = await self._synced(owner, sid)
                        v.feasible(entry.tree.lifetime + len(context), budget, policy)
                        tree, focus = entry.tree, entry.focus
                        if context:  # the session itself is not modified: score over a copy
                            tree = await asyncio.to_thread(
                                self._make_tree, np.concatenate([tree.tokens(), context])
                            )
                            focus = None
                        prepared = await self._prepare(
                            chooser, tree, policy=policy, budget=budget, focus=focus, query=query
                        )
                else:
                    if not context:
                        raise InvalidRequest("context", "must not be empty without a session_id")
                    v.feasible(len(context), budget, policy)
                    tree = await asyncio.to_thread(self._make_tree, context)
                    prepared = await self._prepare(
                        chooser, tree, policy=policy, budget=budget, query=query
                    )
                with tracing.span("engine", rows=prepared.view.working_context.rows):
                    logprobs = await self.engine.score(prepared.embeds, target, request_id)
            return ScoreResult([-lp for lp in logprobs], list(target), prepared.view)

    # -- helpers --------------------------------------------------------------------------------

    async def _prepare(
        self,
        chooser: ContextChooser,
        tree: LifetimeTree,
        *,
        policy: str,
        budget: int,
        seed: int = 0,
        focus: FocusState | None = None,
        query: ContextQuery = NEWEST,
        served: bool = False,
    ) -> _Prepared:
        """Choose and assemble in a worker thread. `served` records metrics for served WCs."""
        with tracing.span("choose_wc", policy=policy, budget=budget):
            return await asyncio.to_thread(
                self._choose_and_assemble, chooser, tree, policy, budget, seed, focus, query, served
            )

    def _choose_and_assemble(
        self,
        chooser: ContextChooser,
        tree: LifetimeTree,
        policy: str,
        budget: int,
        seed: int,
        focus: FocusState | None,
        query: ContextQuery,
        served: bool,
    ) -> _Prepared:
        words = None if query.token_ids is None else np.asarray(query.token_ids, dtype=np.int64)
        tail = self.settings.tail
        choice = chooser.choose(tree, policy, budget, tail, seed=seed, state=focus, query=words)
        wc = choice.working_context
        if served:
            metrics.WC_CHOICE_SECONDS.labels(policy).observe(choice.choice_ms / 1e3)
            metrics.WC_ROWS.observe(wc.rows)
            metrics.WC_PROMPT_ROWS_TOTAL.inc(wc.rows)
            covered = wc.lifetime - wc.start
            metrics.WC_COMPRESSION_RATIO.observe(covered / max(wc.rows, 1))
        view = ContextView(
            wc, budget, tree.gistnet_version, choice.choice_ms, query.source, query.tokens
        )
        return _Prepared(assemble(tree, wc), view, choice, tree, query)

    async def _synced(self, owner: str, session_id: str) -> CachedSession:
        """The session's cached tree, brought up to date with its Redis token log (the source of
        truth, which other replicas may also append to). Callers hold the session lock."""
        entry = self._trees.get(session_id)
        if entry is not None and entry.tree.gistnet_version != self.gistnet_version:
            entry = None  # built with another GistNet: its gists must not meet this one's
        if entry is not None:
            # Re-read a few tokens the tree already holds: Redis can lose acknowledged writes (a
            # crash under appendfsync everysec, a failover to a lagging replica), and answers must
            # never use text the log no longer has.
            seen = min(entry.tree.lifetime, SYNC_OVERLAP)
            start = entry.tree.lifetime - seen
            new = await self.sessions.tokens(session_id, owner, start=start)
            if len(new) >= seen and np.array_equal(new[:seen], entry.tree.tokens(start)):
                if len(new) > seen:
                    await asyncio.to_thread(entry.tree.append, new[seen:])
                    self._trees.trim()
                return entry
            metrics.SESSION_RESYNCS_TOTAL.inc()
            logger.warning(
                "session %s: the token log no longer matches the cached tree (%d tokens); "
                "rebuilding it from the log", session_id, entry.tree.lifetime,
            )  # fmt: skip
        tokens = await self.sessions.tokens(session_id, owner)
        entry = CachedSession(await asyncio.to_thread(self._make_tree, tokens))
        self._trees.put(session_id, entry)
        return entry

    def _lock(self, session_id: str) -> asyncio.Lock:
        lock = self._locks.get(session_id)
        if lock is None:
            lock = self._locks[session_id] = asyncio.Lock()
        return lock
