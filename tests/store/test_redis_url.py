"""Redis URLs (lens_serve/store/redis_url.py) against real processes: the server's and the trainer's
clients authenticate with a password from the URL against `redis-server --requirepass`, a wrong
password is a clear error, and `redis+sentinel://` finds (and follows) the primary through real
`redis-server --sentinel` processes."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import redis
import redis.exceptions
from redis.asyncio import Redis

from lens_serve.service.server import redis_client
from lens_serve.store.redis_url import SentinelURL, connect, parse_sentinel_url
from tests.fake_servicers import make_settings
from tests.fixtures_redis import RedisServerFactory
from trainer.cli import _redis as trainer_redis

PASSWORD = "s3cret-p@ss"  # an '@' on purpose: URLs carry it percent-encoded
URL_PASSWORD = "s3cret-p%40ss"
MASTER = "lens"
_START_TIMEOUT_S = 10.0
# A failover takes ~3 s; a split vote makes the Sentinels wait 2 x failover-timeout (10 s) before
# they elect again, and a loaded CI machine adds to both.
_FAILOVER_TIMEOUT_S = 40.0

Connect = Callable[[str], Redis]
# The two production call sites: the server's client (with its timeouts) and the trainer's.
CLIENTS: dict[str, Connect] = {
    "server": lambda url: redis_client(make_settings(), url),
    "trainer": trainer_redis,
}


# --------------------------------------------------------------------------------------------------
# Password (redis://, unix://)


@pytest.mark.parametrize("who", list(CLIENTS))
async def test_client_authenticates_with_the_url_password(
    who: str, redis_server_factory: RedisServerFactory
) -> None:
    server = redis_server_factory(appendonly=False, requirepass=PASSWORD)
    client = CLIENTS[who](f"unix://:{URL_PASSWORD}@{server.socket}")
    try:
        await client.set("k", "v")
        assert await client.get("k") == b"v"  # bytes: the session store needs them
    finally:
        await client.aclose()


@pytest.mark.parametrize("who", list(CLIENTS))
async def test_wrong_password_is_a_clear_error(
    who: str, redis_server_factory: RedisServerFactory
) -> None:
    server = redis_server_factory(appendonly=False, requirepass=PASSWORD)
    client = CLIENTS[who](f"unix://:wrong@{server.socket}")
    try:
        # Redis' own message reaches the caller. redis-py wraps an AUTH refused while connecting in
        # a ConnectionError, so the trainer's retries run out first (about 10 s).
        with pytest.raises(redis.exceptions.ConnectionError) as error:
            await client.get("k")
        assert "invalid username-password pair" in str(error.value)
        assert isinstance(error.value.__cause__, redis.exceptions.AuthenticationError)
    finally:
        await client.aclose()


async def test_missing_password_is_a_clear_error(redis_server_factory: RedisServerFactory) -> None:
    server = redis_server_factory(appendonly=False, requirepass=PASSWORD)
    client = redis_client(make_settings(), f"unix://{server.socket}")
    try:
        with pytest.raises(redis.exceptions.ConnectionError, match="Authentication required"):
            await client.get("k")
    finally:
        await client.aclose()


# --------------------------------------------------------------------------------------------------
# Sentinel URL parsing


def test_sentinel_url_is_parsed() -> None:
    url = "redis+sentinel://:p%40ss@10.0.0.1:26380,sentinel-b,[::1]:26381/lens-main/3"
    assert parse_sentinel_url(url) == SentinelURL(
        sentinels=(("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 26381)),
        master="lens-main",
        db=3,
        password="p@ss",
    )
    minimal = parse_sentinel_url("redis+sentinel://s1/lens?sentinel_password=x")
    assert (minimal.db, minimal.password, minimal.sentinel_password) == (0, None, "x")
    assert "p@ss" not in repr(parse_sentinel_url(url))


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("redis+sentinel://s1:26379", "path must be"),
        ("redis+sentinel://s1:26379/lens/0/extra", "path must be"),
        ("redis+sentinel://s1:26379/lens/zero", "not a number"),
        ("redis+sentinel:///lens/0", "no Sentinel host"),
        ("redis+sentinel://s1:port/lens", "bad Sentinel address"),
        ("redis+sentinel://s1/lens?ssl=true", "unknown parameters"),
    ],
)
def test_bad_sentinel_url_is_refused(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_sentinel_url(url)


# --------------------------------------------------------------------------------------------------
# Sentinel against real processes


def _free_port() -> int:
    # Bind port 0 and close: the kernel picks a free port (Sentinel needs TCP, as it reports
    # host:port).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_until(check: Callable[[], bool], procs: list[subprocess.Popen[bytes]], what: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"{proc.args!r} exited with {proc.returncode} while waiting for {what}")
        try:
            if check():
                return
        except redis.exceptions.RedisError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not ready after {_START_TIMEOUT_S} s")
        time.sleep(0.05)


def _replica_known(sentinel: redis.Redis) -> bool:
    replicas = sentinel.sentinel_slaves(MASTER)
    return any(r["flags"] == "slave" and r["master-link-status"] == "ok" for r in replicas)


class Cluster:
    """A TCP primary, one replica and two Sentinels monitoring them, all on 127.0.0.1."""

    def __init__(self, directory: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail("redis-server not found: apt-get install redis-server")
        self._exe = executable
        self._dir = directory
        self.procs: list[subprocess.Popen[bytes]] = []
        self.master_port, self.replica_port = _free_port(), _free_port()
        self.sentinel_ports = [_free_port(), _free_port()]

    def _start(self, name: str, args: list[str]) -> None:
        with (self._dir / f"{name}.log").open("ab") as log:  # a file, never a PIPE
            self.procs.append(subprocess.Popen([self._exe, *args], stdout=log, stderr=log))

    def _node_args(self, name: str, port: int) -> list[str]:
        node_dir = self._dir / name
        node_dir.mkdir()
        # The replica authenticates to the primary with the same password (masterauth); the first
        # sync starts at once instead of after the default 5 s wait for more replicas.
        return ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(node_dir), "--requirepass", PASSWORD, "--masterauth", PASSWORD,
                "--repl-diskless-sync-delay", "0"]  # fmt: skip

    def start(self) -> None:
        self._start("master", self._node_args("master", self.master_port))
        replica = self._node_args("replica", self.replica_port)
        self._start("replica", [*replica, "--replicaof", "127.0.0.1", str(self.master_port)])
        replica_client = redis.Redis(port=self.replica_port, password=PASSWORD)
        _wait_until(
            lambda: replica_client.info("replication")["master_link_status"] == "up",
            self.procs,
            "replication",
        )
        replica_client.close()
        for i, port in enumerate(self.sentinel_ports):
            conf = (
                self._dir / f"sentinel-{i}.conf"
            )  # Sentinel rewrites its config: a file of its own
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self._dir}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.master_port} 1\n"
                f"sentinel auth-pass {MASTER} {PASSWORD}\n"
                # Quick failure detection: the test waits on it.
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 5000\n"
            )
            self._start(f"sentinel-{i}", [str(conf), "--sentinel"])
        for port in self.sentinel_ports:
            sentinel = redis.Redis(port=port, decode_responses=True)
            # A replica is promotable once this Sentinel has its INFO and sees its link up.
            _wait_until(partial(_replica_known, sentinel), self.procs, "sentinel")
            sentinel.close()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    @property
    def master(self) -> subprocess.Popen[bytes]:
        return self.procs[0]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://:{URL_PASSWORD}@{hosts}/{MASTER}/0"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.parametrize("who", list(CLIENTS))
async def test_sentinel_url_reaches_the_primary(who: str, cluster: Cluster) -> None:
    client = CLIENTS[who](cluster.url)
    try:
        await client.set("k", "v")
        assert await client.get("k") == b"v"
        # The write reached the primary, not some other server.
        primary = redis.Redis(port=cluster.master_port, password=PASSWORD)
        assert primary.get("k") == b"v"
        primary.close()
    finally:
        await client.aclose()


async def test_server_client_keeps_its_timeouts_through_sentinel(cluster: Cluster) -> None:
    settings = make_settings(redis_socket_timeout_s=1.5, redis_connect_timeout_s=2.5)
    client = redis_client(settings, cluster.url)
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (1.5, 2.5)
        assert kwargs.get("decode_responses", False) is False
        assert await client.ping()
    finally:
        await client.aclose()


async def test_sentinel_client_follows_a_failover(cluster: Cluster) -> None:
    client = connect(cluster.url, socket_timeout=1.0)
    replica = redis.Redis(port=cluster.replica_port, password=PASSWORD)
    try:
        await client.set("before", "1")
        # Replication is asynchronous: kill the primary only once the replica holds the write.
        assert await client.wait(1, 5000) == 1
        # The primary crashes. The Sentinels notice (down-after-milliseconds), agree, and promote
        # the replica; the client's next connection asks them again and must land on it. (A
        # SENTINEL FAILOVER with the old primary alive takes 10 s more: Sentinel demotes it only
        # after a few INFO periods.)
        cluster.master.kill()
        cluster.master.wait()
        deadline = time.monotonic() + _FAILOVER_TIMEOUT_S
        attempt = 0
        while not (
            replica.info("replication")["role"] == "master"
            and await _wrote(client, attempt)
            and replica.get("after") == str(attempt).encode()
        ):
            assert time.monotonic() < deadline, "the client never reached the new primary"
            attempt += 1
            await asyncio.sleep(0.1)
        assert replica.get("before") == b"1"
    finally:
        replica.close()
        await client.aclose()


async def _wrote(client: Redis, value: int) -> bool:
    try:
        await client.set("after", value)
    except redis.exceptions.RedisError:
        return False
    return True
