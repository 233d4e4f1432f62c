"""The `lens-trainer` command: settings, dump + offline runs, and a real process on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from lens_serve.core.embedding import EmbeddingTable
from lens_serve.store.preferences import PREFS_STREAM, RECORD_FIELD
from lens_serve.store.registry import LENSNET
from tests.trainer_synthetic import needle_record
from trainer.cli import main
from trainer.config import TrainerSettings
from trainer.data import read_dump
from trainer.lock import LOCK_KEY

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


def _fill(client: redis.Redis, n: int, model_dir: Path) -> None:
    table = EmbeddingTable.from_checkpoint(model_dir)  # records must be built for the tiny model
    for seed in range(n):
        record = needle_record(seed, table=table, model="tiny")
        client.xadd(PREFS_STREAM, {RECORD_FIELD: record.SerializeToString()})


def _lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_settings_refuse_a_run_without_redis_or_dump(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LENS_TRAINER_REDIS_URL", raising=False)
    with pytest.raises(ValidationError, match="redis_url"):
        TrainerSettings()
    assert main(["run"]) == 2


def test_flags_override_environment_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENS_TRAINER_MIN_RECORDS", "5")
    monkeypatch.setenv("LENS_TRAINER_REDIS_URL", "redis://example:6379/0")
    settings = TrainerSettings()
    assert (settings.min_records, settings.redis_url) == (5, "redis://example:6379/0")
    assert TrainerSettings(min_records=7).min_records == 7
    with pytest.raises(ValidationError):
        settings.min_records = 3  # frozen


def test_dump_then_offline_run_trains_reports_and_publishes_only_with_redis(
    sync_redis: redis.Redis,
    redis_url: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _fill(sync_redis, 48, tiny_model_dir)
    dump = tmp_path / "prefs.bin"
    assert main(["dump", "--out", str(dump), "--redis-url", redis_url]) == 0
    assert len(read_dump(dump)) == 48

    common = ["--model", str(tiny_model_dir), "--max-steps", "40", "--batch-size", "8"]
    common += ["--lr", "0.003", "--held-out-every", "4", "--offline-dump", str(dump)]
    # The held-out split hashes the stream ids (timestamps), so the drift differs run to run;
    # this test is about the command, test_gate checks the drift bound.
    common += ["--max-drift", "10"]
    assert main(["run", *common]) == 0
    out = capsys.readouterr().out
    (report_line,) = _lines(out, "report ")
    report = json.loads(report_line.removeprefix("report "))
    assert report["steps"] == 40
    assert report["new"]["ndcg"] > report["prior"]["ndcg"] == report["current"]["ndcg"]
    assert report["new"]["agreement"] > 0.8 > report["current"]["agreement"]
    assert report["passed"]
    assert not _lines(out, "published ")
    assert sync_redis.get(LENSNET.current_key) is None

    assert main(["run", *common, "--redis-url", redis_url]) == 0
    (published,) = _lines(capsys.readouterr().out, "published ")
    assert sync_redis.get(LENSNET.current_key) == published.removeprefix("published ").encode()
    assert sync_redis.get(LOCK_KEY) is None


def test_run_process_publishes_and_stops_cleanly_on_sigterm(
    sync_redis: redis.Redis, redis_url: str, tiny_model_dir: Path
) -> None:
    _fill(sync_redis, 48, tiny_model_dir)
    args = [sys.executable, "-m", "trainer", "run", "--redis-url", redis_url]
    args += ["--model", str(tiny_model_dir), "--min-records", "24", "--steps-per-version", "20"]
    args += ["--batch-size", "8", "--lr", "0.003", "--held-out-every", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("published ") or not line:
                break
        assert line.startswith("published "), "no published line before the deadline"
        version = line.split()[1]
        assert sync_redis.get(LENSNET.current_key) == version.encode()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rest = proc.stdout.read() if proc.stdout else ""
    assert all(line.startswith("published ") for line in rest.splitlines())
    assert sync_redis.get(LOCK_KEY) is None
