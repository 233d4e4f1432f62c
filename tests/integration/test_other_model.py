"""`lens-serve serve --model <dir>` on a second model family and tokenizer style: `tiny-qwen`
(Qwen3, SentencePiece-style BPE) as a real server process, driven by `LensClient`. Its `tokens`
gists read as a framed list derived from its own tokenizer. A process of its own, so that the test
session keeps its one in-process vLLM engine (on `tiny`)."""

from __future__ import annotations

import inspect
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lens_serve.client import LensClient
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.gistnet import gist_config
from tests.fixtures_redis import RedisServerFactory
from tests.integration.server_process import START_TIMEOUT_S, start_server, wait_listening

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STOP_TIMEOUT_S = 30.0
BUDGET = 256
DOCUMENT = inspect.getsource(inspect)[:6_000]  # long enough for gists under BUDGET rows


@pytest.fixture
def server(
    tiny_qwen_model_dir: Path, redis_server_factory: RedisServerFactory, tmp_path: Path
) -> Iterator[tuple[str, Path]]:
    """(address, log) of a `lens-serve serve` process on tiny-qwen, with a Redis of its own: no
    LensNet or GistNet another test published for `tiny` reaches it."""
    log = tmp_path / "server.log"
    redis_url = redis_server_factory(appendonly=False).url
    args = ["--model", str(tiny_qwen_model_dir), "--port", "0", "--redis-url", redis_url]
    proc = start_server(args, {"LENS_WC_BUDGET": str(BUDGET), "LENS_DRAIN_SECONDS": "1"}, log)
    try:
        yield wait_listening(proc, log), log
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(START_TIMEOUT_S + 120)
async def test_a_second_model_family_serves_framed_gists_and_generates(
    server: tuple[str, Path], tiny_qwen_model_dir: Path
) -> None:
    address, log = server
    # The frame this tokenizer lends `tokens` gists ("[" ... " ...]\n\n"), as the server derives it.
    frame_rows = gist_config(EmbeddingTable.from_checkpoint(tiny_qwen_model_dir)).frame_rows
    assert frame_rows >= 2

    async with LensClient(address, timeout=60) as client:
        session = await client.create_session()
        appended = await client.append(session.session_id, DOCUMENT)
        assert appended.lifetime_tokens > BUDGET

        wc = await client.working_context(session.session_id, wc_budget=BUDGET)
        assert any(span.lod >= 1 for span in wc.spans), "no gists in the working context"
        assert wc.rows - sum(span.rows for span in wc.spans) == frame_rows
        assert wc.rows <= BUDGET and wc.spans[-1].end == wc.lifetime_tokens

        chunks = [
            c
            async for c in client.generate(
                "\n# next:", session_id=session.session_id, max_tokens=8, wc_budget=BUDGET
            )
        ]
    usage = chunks[-1].usage
    assert chunks[-1].finish_reason in ("length", "stop")
    assert sum(len(c.token_ids) for c in chunks) == usage.completion_tokens > 0
    assert usage.gist_covered_tokens > 0 and usage.wc_rows <= BUDGET
    assert "cannot read as a list" not in log.read_text()  # the server found the frame too
