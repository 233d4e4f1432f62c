"""EmbeddedRedis: the private redis-server started when no Redis URL is configured."""

import stat
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis

from lens_serve.store.embedded import LOG_NAME, EmbeddedRedis, EmbeddedRedisError


def test_embedded_redis_answers_on_private_unix_socket(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "data") as server:
        assert server.url.startswith("unix://")
        assert server.running
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping()
            # No TCP listener: port 0 disables it.
            assert client.config_get("port") == {"port": "0"}
        finally:
            client.close()
        run_dir = server.socket_path.parent
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert not run_dir.exists()
    assert (tmp_path / "data" / LOG_NAME).exists()


async def test_embedded_redis_keeps_data_across_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with EmbeddedRedis(data) as server:
        client = Redis.from_url(server.url)
        await client.set("lens:test:key", b"kept")
        await client.aclose()
    async with EmbeddedRedis(data) as server:
        client = Redis.from_url(server.url)
        assert await client.get("lens:test:key") == b"kept"
        await client.aclose()


def test_embedded_redis_refuses_data_dir_in_use(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "data"):
        second = EmbeddedRedis(tmp_path / "data")
        with pytest.raises(EmbeddedRedisError, match="in use"):
            second.start()
    # Released on stop: the directory can be used again.
    with EmbeddedRedis(tmp_path / "data") as server:
        assert server.running


def test_embedded_redis_missing_binary_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    server = EmbeddedRedis(tmp_path / "data")
    with pytest.raises(EmbeddedRedisError, match="apt-get install redis-server"):
        server.start()
    assert not server.running


def test_embedded_redis_start_failure_includes_log_tail(tmp_path: Path) -> None:
    # A "redis-server" that prints a complaint and exits at once.
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL CONFIG FILE ERROR (fake)'\nexit 1\n")
    fake.chmod(0o755)
    server = EmbeddedRedis(tmp_path / "data", executable=str(fake))
    with pytest.raises(EmbeddedRedisError, match="FATAL CONFIG FILE ERROR") as caught:
        server.start()
    assert "exited with status 1" in str(caught.value)
    # The failed start released everything: a real server can use the directory now.
    with EmbeddedRedis(tmp_path / "data") as real:
        assert real.running


def test_embedded_redis_url_before_start_raises(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedRedisError, match="not running"):
        _ = EmbeddedRedis(tmp_path).url
