"""Faults of issue #22 on a real grpc.aio server (the production build_server, servicers and
interceptor; the domain service on a FakeEngine; a real redis-server): uploads bounded while they
stream and tokenized off the event loop, error messages that stay short, the Append stream's
session id, and cancelled streams counted once."""

from __future__ import annotations

import asyncio
import random
import statistics
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from lens_serve.core.allocator import FocusConfig
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.gistnet import GistNetConfig, build_gistnet
from lens_serve.errors import LimitExceeded
from lens_serve.service import validation
from lens_serve.service.composition import assemble_service, build_servicers
from lens_serve.service.config import Settings
from lens_serve.service.hot_swap import WeightStore
from lens_serve.service.server import build_server
from lens_serve.service.validation import Upload
from lens_serve.v1 import lens_serve_pb2 as pb
from lens_serve.v1 import lens_serve_pb2_grpc as pb_grpc
from tests.core_helpers import HIDDEN, random_table
from tests.fakes import FakeEngine

MIB = 1 << 20
ADMIN_TOKEN = "admin-token-1"
GENERATE = "Generate"  # the grpc_method label of LensServe/Generate
BASE_SETTINGS: dict[str, Any] = dict(
    model="fake", host="127.0.0.1", port=0, wc_budget=64, max_wc_budget=256, tail=8,
    block_size=4, max_session_tokens=5000, max_tokens=4, max_model_len=8192, session_ttl_s=3600,
    admin_token=ADMIN_TOKEN,
)  # fmt: skip


@dataclass
class Served:
    target: str
    stub: pb_grpc.LensServeAsyncStub
    admin: pb_grpc.LensAdminAsyncStub
    health: Any  # the published health stubs declare no methods
    engine: FakeEngine


@asynccontextmanager
async def serving(
    redis: Redis,
    make_engine: Callable[[EmbeddingTable, int], FakeEngine] = FakeEngine,
    **overrides: Any,
) -> AsyncIterator[Served]:
    settings = Settings(**{**BASE_SETTINGS, **overrides})
    table = random_table()
    engine = make_engine(table, settings.max_model_len)
    gistnet = build_gistnet(GistNetConfig(block_size=settings.block_size, hidden_size=HIDDEN))
    weights = WeightStore(redis, HIDDEN, seed=0, focus=FocusConfig())
    service = assemble_service(
        settings, engine, redis, table=table, gistnet=gistnet, weights=weights
    )
    serve_servicer, admin_servicer = build_servicers(service)
    health_servicer = health.aio.HealthServicer()
    server, port = build_server(
        settings,
        serve_servicer=serve_servicer,
        admin_servicer=admin_servicer,
        health=health_servicer,
    )
    await server.start()
    try:
        target = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(target) as channel:
            yield Served(
                target,
                pb_grpc.LensServeStub(channel),
                pb_grpc.LensAdminStub(channel),
                health_pb2_grpc.HealthStub(channel),
                engine,
            )
    finally:
        await server.stop(grace=None)
        await service.aclose()


async def new_session(served: Served) -> str:
    return (await served.stub.CreateSession(pb.CreateSessionRequest())).session_id


async def lifetime(served: Served, session_id: str) -> int:
    request = pb.GetSessionRequest(session_id=session_id)
    return (await served.stub.GetSession(request)).lifetime_tokens


async def append_error(served: Served, chunks: Sequence[pb.AppendRequest]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Append(iter(chunks))
    return caught.value


def text_of(n_bytes: int, seed: int = 0) -> str:
    """ASCII prose-like text of exactly `n_bytes` bytes."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_bytes // 4)]
    return (" ".join(words) + "\n" + " " * n_bytes)[:n_bytes]


WORDS = ["the", "lens", "session", "append", "token", "text", "chunk", "health", "of", "a"]


# ---- uploads: bounded while they stream, nothing appended when refused --------------------------


async def test_append_over_the_byte_limit_is_refused_before_the_stream_ends(
    redis_client: Redis,
) -> None:
    async with serving(redis_client, max_append_bytes=4 * MIB, max_session_tokens=8 * MIB) as s:
        session_id = await new_session(s)
        await s.stub.Append(iter([pb.AppendRequest(session_id=session_id, text="kept ")]))
        sent = 0
        chunk = text_of(MIB)
        ended = threading.Event()

        def chunks() -> Iterator[pb.AppendRequest]:
            nonlocal sent
            for i in range(20):
                # Past the limit, each further chunk waits for the call to end (a server that
                # reads everything before refusing would keep it open): the client's sending
                # speed cannot decide the test.
                if i > 5 and ended.wait(timeout=10):
                    return
                sent += 1
                yield pb.AppendRequest(session_id=session_id if i == 0 else "", text=chunk)

        def upload() -> None:
            # The blocking client: the asyncio one may report INTERNAL when the server ends a
            # call while it is still sending (grpc/grpc#36066).
            try:
                with grpc.insecure_channel(s.target) as channel:
                    pb_grpc.LensServeStub(channel).Append(chunks())
            finally:
                ended.set()

        with pytest.raises(grpc.RpcError) as caught:
            await asyncio.to_thread(upload)
        assert isinstance(caught.value, grpc.Call)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (caught.value.details() or "").startswith("text:")
        assert sent < 20  # refused while it streamed, not after reading it all
        assert await lifetime(s, session_id) == len("kept ")  # all or nothing


async def test_append_over_the_token_limit_appends_nothing(redis_client: Redis) -> None:
    async with serving(redis_client, max_session_tokens=1000) as s:
        session_id = await new_session(s)
        # The fake tokenizer makes a token of every byte: 600 + 600 tokens > 1000.
        error = await append_error(
            s,
            [
                pb.AppendRequest(session_id=session_id, text="a" * 600),
                pb.AppendRequest(token_ids=[5] * 600),
            ],
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (error.details() or "").startswith("token_ids:")
        assert await lifetime(s, session_id) == 0


async def test_append_mixes_text_and_token_ids_in_order(redis_client: Redis) -> None:
    async with serving(redis_client) as s:
        session_id = await new_session(s)
        chunks = [
            pb.AppendRequest(session_id=session_id, text="ab"),
            pb.AppendRequest(text="c"),
            pb.AppendRequest(token_ids=[9, 10]),
            pb.AppendRequest(text="d"),
        ]
        response = await s.stub.Append(iter(chunks))
        assert (response.lifetime_tokens, response.appended_tokens) == (6, 6)
        stored = await s.stub.GetSession(pb.GetSessionRequest(session_id=session_id))
        assert stored.lifetime_tokens == 6


@pytest.fixture
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir)


class TokenizingEngine(FakeEngine):
    """A FakeEngine with a real tokenizer, so that tokenizing costs what it does in production."""

    tokenizer: Any = None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return [int(t) for t in ids]


async def _poll(served: Served, other_session: str, stop: asyncio.Event) -> list[float]:
    """Latencies of health checks and of another session's GetSession, back to back."""
    latencies = []
    while not stop.is_set():
        began = time.perf_counter()
        await served.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        await served.stub.GetSession(pb.GetSessionRequest(session_id=other_session), timeout=5)
        latencies.append(time.perf_counter() - began)
        await asyncio.sleep(0.02)
    return latencies


@pytest.mark.slow
async def test_health_and_other_sessions_answer_during_the_largest_upload(
    redis_client: Redis, tiny_tokenizer: Any
) -> None:
    def make_engine(table: EmbeddingTable, max_model_len: int) -> FakeEngine:
        engine = TokenizingEngine(table, max_model_len)
        engine.tokenizer = tiny_tokenizer
        return engine

    limit = 4 * MIB
    overrides = dict(max_append_bytes=limit, max_session_tokens=limit)
    async with serving(redis_client, make_engine, **overrides) as s:
        session_id, other = await new_session(s), await new_session(s)
        chunk = text_of(MIB)
        stop = asyncio.Event()
        poller = asyncio.create_task(_poll(s, other, stop))
        began = time.perf_counter()
        try:
            chunks = [pb.AppendRequest(session_id=session_id, text=chunk)]
            chunks += [pb.AppendRequest(text=chunk)] * (limit // MIB - 1)
            response = await s.stub.Append(iter(chunks))
        finally:
            stop.set()
            latencies = await poller
        upload_s = time.perf_counter() - began
    assert response.appended_tokens == len(tiny_tokenizer.encode(chunk * (limit // MIB)))
    # Tokenizing 4 MiB takes seconds; the calls around it must not wait for it.
    assert len(latencies) >= 10, (upload_s, latencies)
    assert max(latencies) < 0.5, (upload_s, statistics.quantiles(latencies, n=10), max(latencies))


# ---- uploads: pieces tokenize to the ids of the whole text ---------------------------------------

TRICKY_TEXT = (
    "def f(x):\n    return x  +  1\t# tabs\t\tand  runs   of spaces\n\n\n"
    "Numbers 12345 67.89, punctuation!?... don't can't we'll; "
    "unicode café naïve — 東京 タワー 🙂🙃 end\r\nfinal   "
)


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
async def test_upload_pieces_tokenize_like_the_whole_text(
    model: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    import transformers

    model_dir = request.getfixturevalue(f"{model}_model_dir")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)

    def encode(text: str) -> list[int]:
        return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]

    rng = random.Random(0)
    text = "".join(TRICKY_TEXT[rng.randrange(len(TRICKY_TEXT)) :] for _ in range(60))
    monkeypatch.setattr(validation, "_PIECE_CHARS", 97)  # many pieces, cut mid-line
    for seed in range(5):
        rng = random.Random(seed)
        upload = Upload(encode, list, max_bytes=len(text.encode()), max_tokens=len(text))
        start = 0
        while start < len(text):  # chunks that split words, runs of spaces and lines
            end = min(len(text), start + rng.randrange(1, 300))
            await upload.add_text(text[start:end])
            start = end
        assert list(await upload.finish()) == encode(text), seed


async def test_upload_refuses_text_past_the_byte_limit_at_once() -> None:
    encoded: list[str] = []

    def encode(text: str) -> list[int]:
        encoded.append(text)
        return [1] * len(text)

    upload = Upload(encode, list, max_bytes=10, max_tokens=100)
    await upload.add_text("é" * 5)  # 10 bytes in UTF-8
    with pytest.raises(LimitExceeded, match=r"^text:"):
        await upload.add_text("x")
    assert encoded == []  # refused before any of it was tokenized


# ---- error messages stay short ------------------------------------------------------------------


async def test_long_session_id_is_invalid_argument_with_a_short_message(
    redis_client: Redis,
) -> None:
    long_id = "a" * 10_000
    async with serving(redis_client) as s:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await s.stub.GetSession(pb.GetSessionRequest(session_id=long_id))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = caught.value.details() or ""
        assert details.startswith("session_id:") and len(details) < 300, details
        error = await append_error(s, [pb.AppendRequest(session_id=long_id, text="x")])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(error.details() or "") < 300


async def test_unknown_session_id_is_not_found(redis_client: Redis) -> None:
    async with serving(redis_client) as s:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await s.stub.GetSession(pb.GetSessionRequest(session_id="f" * 32))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_error_messages_from_any_layer_are_cut_short(redis_client: Redis) -> None:
    # The registry quotes the version it did not find; the one error map keeps that short.
    async with serving(redis_client) as s:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await s.admin.SetLensVersion(
                pb.SetLensVersionRequest(version="v" * 10_000),
                metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert len(caught.value.details() or "") < 600


# ---- the Append stream's session id -------------------------------------------------------------


async def test_append_without_session_id_on_the_first_chunk_appends_nothing(
    redis_client: Redis,
) -> None:
    async with serving(redis_client) as s:
        session_id = await new_session(s)
        for chunks in (
            [pb.AppendRequest(text="early "), pb.AppendRequest(session_id=session_id, text="x")],
            [pb.AppendRequest(session_id=session_id, text="a"), pb.AppendRequest(session_id="b")],
            [pb.AppendRequest(session_id=session_id, text="a", token_ids=[5])],
            [],
        ):
            error = await append_error(s, chunks)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, chunks
            field = "text" if chunks and chunks[0].token_ids else "session_id"
            assert (error.details() or "").startswith(f"{field}:"), error.details()
        assert await lifetime(s, session_id) == 0


async def test_append_repeating_the_session_id_on_later_chunks_is_accepted(
    redis_client: Redis,
) -> None:
    async with serving(redis_client) as s:
        session_id = await new_session(s)
        chunks = [pb.AppendRequest(session_id=session_id, text="ab")] * 2
        assert (await s.stub.Append(iter(chunks))).appended_tokens == 4


async def test_a_retried_append_stream_with_an_idempotency_key_appends_once(
    redis_client: Redis,
) -> None:
    async with serving(redis_client) as s:
        session_id = await new_session(s)
        chunks = [
            pb.AppendRequest(session_id=session_id, idempotency_key="up-1", text="abc"),
            pb.AppendRequest(text="de"),
        ]
        first = await s.stub.Append(iter(chunks))
        retry = await s.stub.Append(iter(chunks))
        assert (first.lifetime_tokens, first.appended_tokens) == (5, 5)
        assert (retry.lifetime_tokens, retry.appended_tokens) == (5, 5)
        late_key = [pb.AppendRequest(session_id=session_id), pb.AppendRequest(idempotency_key="k")]
        error = await append_error(s, late_key)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (error.details() or "").startswith("idempotency_key:")
        assert await lifetime(s, session_id) == 5


# ---- cancelled streams are counted once ---------------------------------------------------------


def errors_total(method: str, code: str) -> float:
    labels = {"grpc_service": "lens_serve.v1.LensServe", "grpc_method": method, "grpc_code": code}
    return REGISTRY.get_sample_value("lens_rpc_errors_total", labels) or 0.0


async def test_cancelled_streams_are_counted_once_each(redis_client: Redis) -> None:
    async with serving(redis_client) as s:
        before = errors_total(GENERATE, "CANCELLED")
        # Long streams: each is mid-stream (writing or generating) when it is cancelled.
        request = pb.GenerateRequest(prompt="x" * 40, sampling=pb.SamplingParams(max_tokens=4000))
        calls = [s.stub.Generate(request) for _ in range(16)]
        for call in calls:
            assert isinstance(await call.read(), pb.GenerateResponse)
        for call in calls:
            call.cancel()
        for _ in range(500):  # the server sees each cancellation a little later
            if len(s.engine.aborted) == 16 and errors_total(GENERATE, "CANCELLED") >= before + 16:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # nothing more may be counted afterwards
        assert len(s.engine.aborted) == 16
        assert errors_total(GENERATE, "CANCELLED") == before + 16
