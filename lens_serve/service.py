"""LensServe's domain logic: sessions, working contexts, generation and scoring.

No gRPC types here: the servicer converts protos to the inputs below and back. Every request is
validated completely before anything is written, so a bad request never changes a session. CPU work
on trees and LensNet runs in worker threads, never on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from redis.asyncio import Redis

from lens_serve import metrics
from lens_serve.aio import cancel_and_wait
from lens_serve.allocator import FocusConfig, FocusState
from lens_serve.assembly import assemble
from lens_serve.config import Settings
from lens_serve.context import WorkingContext, levels_for, validate_budget
from lens_serve.embedding import EmbeddingTable
from lens_serve.engine import Engine, GenerationParams
from lens_serve.errors import InvalidRequest, Overloaded
from lens_serve.gist_store import current_gistnet
from lens_serve.gistnet import GistNet, build_gistnet, gist_config
from lens_serve.models import resolve_model
from lens_serve.policies import POLICIES, Choice, ContextChooser, check_feasible
from lens_serve.preferences import PreferenceLog
from lens_serve.sessions import SessionFull, SessionInfo, SessionStore
from lens_serve.shadow import ShadowConfig, ShadowJob, ShadowScorer
from lens_serve.tree import LifetimeTree
from lens_serve.tree_cache import CachedSession, TreeCache
from lens_serve.weights import WeightStore

logger = logging.getLogger(__name__)

PREWARM_PRIORITY = 5
"""vLLM priority of next-turn prefills: after user requests (0), before shadow scoring (10)."""

MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
MAX_TEMPERATURE = 10.0


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerateInput:
    session_id: str = ""
    prompt: str = ""
    prompt_token_ids: tuple[int, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    wc_budget: int = 0
    policy: str = ""
    chat: bool = False


@dataclass(frozen=True)
class ScoreInput:
    session_id: str = ""
    context: str = ""
    context_token_ids: tuple[int, ...] = ()
    continuation: str = ""
    continuation_token_ids: tuple[int, ...] = ()
    wc_budget: int = 0
    policy: str = ""


@dataclass(frozen=True)
class ContextView:
    """A chosen working context with what the caller needs to report it."""

    working_context: WorkingContext
    budget: int
    gistnet_version: str
    choice_ms: float


@dataclass(frozen=True)
class Usage:
    lifetime_tokens: int
    wc_rows: int
    gist_covered_tokens: int
    lens_version: str
    wc_choice_ms: float
    completion_tokens: int
    cached_rows: int
    prompt_tokens: int
    policy: str
    gistnet_version: str


@dataclass(frozen=True)
class GenerateEvent:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str = ""
    usage: Usage | None = None


@dataclass(frozen=True)
class ScoreResult:
    token_nll: list[float]
    continuation_token_ids: list[int]
    view: ContextView

    @property
    def mean_nll(self) -> float:
        return sum(self.token_nll) / len(self.token_nll)


@dataclass(frozen=True)
class _Prepared:
    """Everything a request needs from its context, taken under the session lock."""

    embeds: torch.Tensor  # (rows, D)
    view: ContextView
    choice: Choice
    tree: LifetimeTree  # what the choice was made on (positions < its lifetime never change)


class LensService:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        redis: Redis,
        sessions: SessionStore,
        weights: WeightStore,
        gistnet: GistNet,
        table: EmbeddingTable,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = redis
        self.sessions = sessions
        self.weights = weights
        self._gistnet = gistnet
        self._table = table
        self._trees = TreeCache(settings.tree_cache_bytes)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._in_flight = 0
        self.shadow: ShadowScorer | None = None
        if settings.shadow_rate > 0:
            self.shadow = ShadowScorer(
                engine,
                PreferenceLog(redis, maxlen=settings.prefs_maxlen),
                ShadowConfig(
                    rate=settings.shadow_rate,
                    queue_size=settings.shadow_queue,
                    random_variants=settings.shadow_variants,
                    guided_share=settings.shadow_guided_share,
                    max_lifetime=settings.shadow_max_lifetime,
                    seed=settings.lens_seed,
                ),
                model=settings.model,
                make_tree=self._tree,
            )
        self._tasks: set[asyncio.Task[None]] = set()  # the watcher and the shadow worker
        self._prewarms: set[asyncio.Task[None]] = set()

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
        await cancel_and_wait(self._tasks | self._prewarms)

    async def settle_prewarms(self) -> None:
        """Wait for the next-turn prefills started so far (tests and benchmarks)."""
        await asyncio.gather(*self._prewarms)

    @classmethod
    async def create(cls, settings: Settings, engine: Engine, redis: Redis) -> LensService:
        model_dir = resolve_model(settings.model, settings.models_dir)
        table = EmbeddingTable.from_checkpoint(model_dir)
        configured = build_gistnet(
            gist_config(
                table,
                kind=settings.gist_kind,  # type: ignore[arg-type]  # validated by Settings
                block_size=settings.block_size,
                rows=settings.gist_rows,
            ),
            table,
        )
        # A published GistNet replaces the configured one only if it fits this server's trees.
        published = await current_gistnet(
            redis, table.hidden_size, settings.block_size, settings.gist_rows
        )
        gistnet = published or configured
        logger.info("GistNet %s (%s)", gistnet.version, "published" if published else "configured")
        weights = WeightStore(redis, table.hidden_size, settings.lens_seed, FocusConfig())
        await weights.start()
        store = SessionStore(
            redis, settings.session_ttl_s, settings.max_session_tokens, model=settings.model
        )
        service = cls(settings, engine, redis, store, weights, gistnet, table)
        service.start_background()
        return service

    @property
    def gistnet_version(self) -> str:
        return self._gistnet.version

    # -- sessions -------------------------------------------------------------------------------

    async def create_session(self, owner: str) -> SessionInfo:
        return await self.sessions.create(owner)

    async def get_session(self, owner: str, session_id: str) -> tuple[SessionInfo, int]:
        """The session and its number of tree levels."""
        info = await self.sessions.get(_session_id(session_id), owner)
        return info, levels_for(info.lifetime_tokens, self.settings.block_size)

    async def delete_session(self, owner: str, session_id: str) -> None:
        await self.sessions.delete(_session_id(session_id), owner)
        self._trees.drop(session_id)

    async def append(
        self, owner: str, session_id: str, parts: Sequence[str | Sequence[int]]
    ) -> tuple[int, int]:
        """Append text runs (tokenized whole) and token-id runs, in order, as one atomic append.
        Returns the new lifetime and the number of tokens appended."""
        ids: list[int] = []
        for part in parts:
            ids += (
                self._encode(part) if isinstance(part, str) else self._check_ids(part, "token_ids")
            )
        sid = _session_id(session_id)
        async with self._lock(sid):
            return await self.sessions.append(sid, owner, ids), len(ids)

    # -- working contexts -----------------------------------------------------------------------

    async def working_context(
        self, owner: str, session_id: str, wc_budget: int, policy: str
    ) -> ContextView:
        sid = _session_id(session_id)
        budget, policy = self._budget(wc_budget), self._policy(policy)
        chooser = self.weights.chooser
        async with self._lock(sid):
            entry = await self._synced(owner, sid)
            self._precheck(entry.tree.lifetime, budget, policy)
            prepared = await asyncio.to_thread(
                self._prepare, chooser, entry.tree, policy, budget, 0, entry.focus, False
            )
        return prepared.view

    # -- generation -----------------------------------------------------------------------------

    async def generate(
        self, owner: str, request: GenerateInput
    ) -> AsyncGenerator[GenerateEvent, None]:
        arrived = time.monotonic()
        request_id = uuid.uuid4().hex
        prompt = self._prompt_ids(request)
        budget, policy = self._budget(request.wc_budget), self._policy(request.policy)
        params = self._params(request.sampling, budget)
        chooser = self.weights.chooser  # the whole request runs on this LensNet version
        sid = _session_id(request.session_id) if request.session_id else ""
        with self._slot():
            if sid:
                prepared = await self._prepare_turn(
                    owner, sid, prompt, budget, policy, params, chooser, request.sampling.seed
                )
            else:
                self._precheck(len(prompt), budget, policy)
                tree = await asyncio.to_thread(self._tree, prompt)
                prepared = await asyncio.to_thread(
                    self._prepare, chooser, tree, policy, budget, request.sampling.seed, None, True
                )
            completion: list[int] = []
            cached_rows = 0
            async for chunk in self.engine.generate(prepared.embeds, params, request_id):
                if not completion and chunk.token_ids:
                    metrics.TIME_TO_FIRST_TOKEN_SECONDS.observe(time.monotonic() - arrived)
                completion += chunk.token_ids
                cached_rows = max(cached_rows, chunk.cached_rows)
                if chunk.finish_reason is None:
                    yield GenerateEvent(request_id, chunk.text, chunk.token_ids)
                    continue
                if sid and completion:
                    async with self._lock(sid):
                        await self.sessions.append(sid, owner, completion)
                    if self.settings.prewarm_next_turn:
                        self._prewarm(prepared.embeds, completion)
                self._maybe_shadow(request_id, sid, policy, prepared, prompt, completion, chooser)
                metrics.WC_CACHED_ROWS_TOTAL.inc(cached_rows)
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
                )
                yield GenerateEvent(
                    request_id, chunk.text, chunk.token_ids, chunk.finish_reason, usage
                )

    async def _prepare_turn(
        self,
        owner: str,
        sid: str,
        prompt: list[int],
        budget: int,
        policy: str,
        params: GenerationParams,
        chooser: ContextChooser,
        seed: int,
    ) -> _Prepared:
        """Check, append the prompt to the session, and choose its working context."""
        async with self._lock(sid):
            info = await self.sessions.get(sid, owner)
            lifetime = info.lifetime_tokens + len(prompt)
            self._precheck(lifetime, budget, policy)
            limit = self.settings.max_session_tokens
            if lifetime + params.max_tokens > limit:  # refuse now, not after generating
                raise SessionFull(sid, info.lifetime_tokens, len(prompt) + params.max_tokens, limit)
            await self.sessions.append(sid, owner, prompt)
            entry = await self._synced(owner, sid)
            prepared = await asyncio.to_thread(
                self._prepare, chooser, entry.tree, policy, budget, seed, entry.focus, True
            )
            if prepared.choice.focus is not None:
                entry.focus = prepared.choice.focus  # the session's next turn continues from here
            return prepared

    def _prewarm(self, wc_rows: torch.Tensor, answer: list[int]) -> None:
        """Prefill `wc_rows` + the answer's rows in the background at PREWARM_PRIORITY.

        vLLM never reuses the KV of decoded tokens for a later prompt of embeddings (it hashes
        decoded tokens by id and prompt rows by their bytes), so without this every turn
        recomputes the previous answer before its first token. The next turn's WC starts with
        exactly these rows whenever the allocator only appends (it keeps headroom for that)."""
        rows = torch.cat([wc_rows, self._table(torch.tensor(answer))])  # (WC + answer, D)
        if rows.shape[0] >= self.engine.max_model_len:
            return
        task = asyncio.create_task(self._prefill(rows, f"prewarm-{uuid.uuid4().hex}"))
        self._prewarms.add(task)
        task.add_done_callback(self._prewarms.discard)

    async def _prefill(self, rows: torch.Tensor, request_id: str) -> None:
        try:
            params = GenerationParams(max_tokens=1, temperature=0.0)
            async for _ in self.engine.generate(rows, params, request_id, PREWARM_PRIORITY):
                pass
            metrics.PREWARMED_ROWS_TOTAL.inc(rows.shape[0])
        except Exception as e:  # an optimisation only: the next turn just computes more
            logger.warning("prewarm %s failed: %r", request_id, e)

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
        if self.shadow is None or not self.shadow.wants(wc.lifetime):
            return
        lifetime = prepared.tree.tokens(0, wc.lifetime).copy()
        served: WorkingContext | None = wc
        tiling = prepared.choice.focus.tiling if prepared.choice.focus is not None else None
        target = completion
        if self.settings.shadow_target == "prompt":
            held_out = min(self.settings.shadow_target_tokens, len(prompt) - 1)
            if held_out < 1:
                return
            lifetime, target = lifetime[:-held_out], lifetime[-held_out:].tolist()
            served, tiling = None, None  # re-chosen over the shorter lifetime in the worker
        if not target:
            return
        self.shadow.submit(
            ShadowJob(
                request_id=request_id,
                session_id=sid,
                policy=policy,
                lifetime_tokens=lifetime,
                served=served,
                served_tiling=tiling,
                target_ids=target,
                budget=prepared.view.budget,
                tail=self.settings.tail,
                chooser=chooser,
            )
        )

    # -- scoring --------------------------------------------------------------------------------

    async def score(self, owner: str, request: ScoreInput) -> ScoreResult:
        context = self._either(request.context, request.context_token_ids, "context")
        target = self._either(request.continuation, request.continuation_token_ids, "continuation")
        if not target:
            raise InvalidRequest("continuation", "must not be empty")
        budget, policy = self._budget(request.wc_budget), self._policy(request.policy)
        if budget + len(target) > self.engine.max_model_len:
            raise InvalidRequest(
                "continuation",
                f"{len(target)} tokens after a {budget}-row context exceed the model's "
                f"{self.engine.max_model_len} positions",
            )
        chooser = self.weights.chooser
        with self._slot():
            if request.session_id:
                sid = _session_id(request.session_id)
                async with self._lock(sid):
                    entry = await self._synced(owner, sid)
                    self._precheck(entry.tree.lifetime + len(context), budget, policy)
                    tree, focus = entry.tree, entry.focus
                    if context:  # the session itself is not modified: score over a copy
                        tree = await asyncio.to_thread(
                            self._tree, np.concatenate([tree.tokens(), context])
                        )
                        focus = None
                    prepared = await asyncio.to_thread(
                        self._prepare, chooser, tree, policy, budget, 0, focus, False
                    )
            else:
                if not context:
                    raise InvalidRequest("context", "must not be empty without a session_id")
                self._precheck(len(context), budget, policy)
                tree = await asyncio.to_thread(self._tree, context)
                prepared = await asyncio.to_thread(
                    self._prepare, chooser, tree, policy, budget, 0, None, False
                )
            logprobs = await self.engine.score(prepared.embeds, target, uuid.uuid4().hex)
        return ScoreResult([-lp for lp in logprobs], list(target), prepared.view)

    # -- helpers --------------------------------------------------------------------------------

    def _prepare(
        self,
        chooser: ContextChooser,
        tree: LifetimeTree,
        policy: str,
        budget: int,
        seed: int,
        focus: FocusState | None,
        served: bool,
    ) -> _Prepared:
        """Choose and assemble (in a worker thread). `served` records metrics for served WCs."""
        choice = chooser.choose(tree, policy, budget, self.settings.tail, seed=seed, state=focus)
        wc = choice.working_context
        if served:
            metrics.WC_CHOICE_SECONDS.labels(policy).observe(choice.choice_ms / 1e3)
            metrics.WC_ROWS.observe(wc.rows)
            metrics.WC_PROMPT_ROWS_TOTAL.inc(wc.rows)
            covered = wc.lifetime - wc.start
            metrics.WC_COMPRESSION_RATIO.observe(covered / max(wc.rows, 1))
        view = ContextView(wc, budget, tree.gistnet_version, choice.choice_ms)
        return _Prepared(assemble(tree, wc), view, choice, tree)

    def _tree(self, token_ids: Sequence[int] | np.ndarray) -> LifetimeTree:
        tree = LifetimeTree(self._gistnet, self._table)
        tree.append(token_ids)
        return tree

    async def _synced(self, owner: str, session_id: str) -> CachedSession:
        """The session's cached tree, brought up to date with its Redis token log (the source of
        truth, which other replicas may also append to). Callers hold the session lock."""
        entry = self._trees.get(session_id)
        if entry is not None and entry.tree.gistnet_version != self._gistnet.version:
            entry = None  # built with another GistNet: its gists must not meet this one's
        if entry is None:
            tokens = await self.sessions.tokens(session_id, owner)
            entry = CachedSession(await asyncio.to_thread(self._tree, tokens))
            self._trees.put(session_id, entry)
            return entry
        new = await self.sessions.tokens(session_id, owner, start=entry.tree.lifetime)
        if len(new):
            await asyncio.to_thread(entry.tree.append, new)
            self._trees.trim()
        return entry

    def _precheck(self, lifetime: int, budget: int, policy: str) -> None:
        """Refuse an impossible budget before anything is written (the chooser's own rules)."""
        s = self.settings
        frame = self._gistnet.config.frame_rows
        check_feasible(policy, lifetime, budget, s.tail, s.block_size, s.gist_rows, frame)

    def _budget(self, wc_budget: int) -> int:
        budget = wc_budget or self.settings.wc_budget
        if budget > self.settings.max_wc_budget:
            raise InvalidRequest(
                "wc_budget", f"{budget} exceeds this server's max of {self.settings.max_wc_budget}"
            )
        validate_budget(budget, self.settings.tail)
        return budget

    @staticmethod
    def _policy(policy: str) -> str:
        name = policy or "lens"
        if name not in POLICIES:
            raise InvalidRequest("policy", f"must be one of {POLICIES}, got {policy!r}")
        return name

    def _params(self, sampling: Sampling, budget: int) -> GenerationParams:
        s = self.settings
        max_tokens = sampling.max_tokens or s.max_tokens
        if max_tokens > s.max_completion_tokens:
            raise InvalidRequest(
                "sampling.max_tokens", f"{max_tokens} exceeds the max of {s.max_completion_tokens}"
            )
        if budget + max_tokens > self.engine.max_model_len:
            raise InvalidRequest(
                "sampling.max_tokens",
                f"a {budget}-row context plus {max_tokens} tokens exceeds the model's "
                f"{self.engine.max_model_len} positions",
            )
        if (
            not math.isfinite(sampling.temperature)
            or not 0 <= sampling.temperature <= MAX_TEMPERATURE
        ):
            raise InvalidRequest("sampling.temperature", f"must be in [0, {MAX_TEMPERATURE}]")
        top_p = sampling.top_p or 1.0
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise InvalidRequest("sampling.top_p", "must be in (0, 1]")
        if len(sampling.stop) > MAX_STOP_STRINGS or any(
            not stop or len(stop) > MAX_STOP_CHARS for stop in sampling.stop
        ):
            raise InvalidRequest(
                "sampling.stop",
                f"at most {MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_CHARS} chars",
            )
        return GenerationParams(
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=top_p,
            seed=sampling.seed or None,
            stop=sampling.stop,
        )

    def _prompt_ids(self, request: GenerateInput) -> list[int]:
        if request.prompt and request.prompt_token_ids:
            raise InvalidRequest("prompt", "give prompt or prompt_token_ids, not both")
        if request.prompt_token_ids:
            if request.chat:
                raise InvalidRequest("chat", "the chat template applies to a text prompt only")
            return self._check_ids(request.prompt_token_ids, "prompt_token_ids")
        if not request.prompt:
            raise InvalidRequest("prompt", "must not be empty")
        if request.chat:
            return self.engine.apply_chat_template([{"role": "user", "content": request.prompt}])
        return self._encode(request.prompt)

    def _either(self, text: str, ids: Sequence[int], field_name: str) -> list[int]:
        if text and ids:
            raise InvalidRequest(
                field_name, f"give {field_name} or {field_name}_token_ids, not both"
            )
        return self._check_ids(ids, f"{field_name}_token_ids") if ids else self._encode(text)

    def _encode(self, text: str) -> list[int]:
        return self.engine.encode(text) if text else []

    def _check_ids(self, ids: Sequence[int], field_name: str) -> list[int]:
        vocab = self._table.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise InvalidRequest(field_name, f"ids must lie in [0, {vocab}), got {bad[:3]}")
        return list(ids)

    def _lock(self, session_id: str) -> asyncio.Lock:
        lock = self._locks.get(session_id)
        if lock is None:
            lock = self._locks[session_id] = asyncio.Lock()
        return lock

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        if self._in_flight >= self.settings.max_concurrency:
            raise Overloaded(
                f"{self._in_flight} requests in flight (max_concurrency); retry with backoff"
            )
        self._in_flight += 1
        metrics.RPCS_IN_FLIGHT.inc()
        try:
            yield
        finally:
            self._in_flight -= 1
            metrics.RPCS_IN_FLIGHT.dec()


def _session_id(session_id: str) -> str:
    if not session_id:
        raise InvalidRequest("session_id", "must not be empty")
    return session_id
