"""Redis URLs (lens_serve/store/redis_url.py) against real processes: the server's and the trainer's
clients authenticate with a password from the URL against `redis-server --requirepass`, a wrong
password is a clear error, and `redis+sentinel://` finds (and follows) the primary through real
`redis-server --sentinel` processes; `rediss+sentinel://` does the same over TLS (TLS-only servers
that also require client certificates)."""

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
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from lens_serve.service.server import redis_client
from lens_serve.store.redis_url import SentinelURL, connect, parse_sentinel_url
from tests.fake_servicers import make_settings
from tests.fixtures_redis import RedisServerFactory, TLSFiles, make_tls_files
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


def test_tls_sentinel_url_is_parsed() -> None:
    # The same query parameters as redis-py's rediss:// URLs, percent-decoded.
    url = (
        "rediss+sentinel://:p%40ss@s1,s2:26380/lens/1?ssl_ca_certs=/etc/ca%20dir/ca.pem"
        "&ssl_certfile=/c.pem&ssl_keyfile=/k.pem&ssl_cert_reqs=optional&ssl_check_hostname=false"
        "&sentinel_password=x"
    )
    target = parse_sentinel_url(url)
    assert target == SentinelURL(
        sentinels=(("s1", 26379), ("s2", 26380)),
        master="lens",
        db=1,
        password="p@ss",
        sentinel_password="x",
        tls=True,
        ssl_ca_certs="/etc/ca dir/ca.pem",
        ssl_certfile="/c.pem",
        ssl_keyfile="/k.pem",
        ssl_cert_reqs="optional",
        ssl_check_hostname=False,
    )
    assert target.tls_kwargs() == {
        "ssl": True,
        "ssl_ca_certs": "/etc/ca dir/ca.pem",
        "ssl_certfile": "/c.pem",
        "ssl_keyfile": "/k.pem",
        "ssl_cert_reqs": "optional",
        "ssl_check_hostname": False,
    }
    assert repr(target) == "SentinelURL(rediss+sentinel://s1:26379,s2:26380/lens/1)"
    # Without parameters: TLS with redis-py's defaults (verify against the system CAs).
    assert parse_sentinel_url("rediss+sentinel://s1/lens").tls_kwargs() == {"ssl": True}
    assert parse_sentinel_url("redis+sentinel://s1/lens").tls_kwargs() == {}


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("redis+sentinel://s1:26379", "path must be"),
        ("redis+sentinel://s1:26379/lens/0/extra", "path must be"),
        ("redis+sentinel://s1:26379/lens/zero", "not a number"),
        ("redis+sentinel:///lens/0", "no Sentinel host"),
        ("redis+sentinel://s1:port/lens", "bad Sentinel address"),
        ("redis+sentinel://s1/lens?ssl=true", "unknown parameters"),
        ("rediss+sentinel://s1/lens?ssl=true", r"rediss\+sentinel URL: unknown parameters"),
        ("rediss+sentinel://s1/lens?ssl_ca_cert=/ca.pem", "unknown parameters"),
        ("redis+sentinel://s1/lens?ssl_ca_certs=/ca.pem", r"use rediss\+sentinel:// for TLS"),
        ("rediss+sentinel://s1/lens?ssl_cert_reqs=yes", "ssl_cert_reqs 'yes' is not one of"),
        ("rediss+sentinel://s1/lens?ssl_check_hostname=maybe", "is not true or false"),
        ("rediss+sentinel://s1/lens?ssl_keyfile=/k.pem", "ssl_keyfile needs ssl_certfile"),
        ("rediss+sentinel://s1:port/lens", r"rediss\+sentinel URL: bad Sentinel address"),
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


class _Servers:
    """redis-server processes started in `directory` (their logs there too), stopped together."""

    def __init__(self, directory: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail("redis-server not found: apt-get install redis-server")
        self._exe = executable
        self._dir = directory
        self.procs: list[subprocess.Popen[bytes]] = []

    def _start(self, name: str, args: list[str]) -> None:
        with (self._dir / f"{name}.log").open("ab") as log:  # a file, never a PIPE
            self.procs.append(subprocess.Popen([self._exe, *args], stdout=log, stderr=log))

    def stop(self) -> None:
        """Terminate every process, then wait for each (killing one that does not go in 5 s)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Cluster(_Servers):
    """A TCP primary, one replica and two Sentinels monitoring them, all on 127.0.0.1."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.master_port, self.replica_port = _free_port(), _free_port()
        self.sentinel_ports = [_free_port(), _free_port()]

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


# --------------------------------------------------------------------------------------------------
# TLS through Sentinel (rediss+sentinel://) against real processes


def _tls_args(tls: TLSFiles) -> list[str]:
    # TLS only (port 0); clients must present a certificate the CA accepts (tls-auth-clients
    # defaults to yes), so the URL's client certificate is tested too.
    return ["--port", "0", "--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key),
            "--tls-ca-cert-file", str(tls.cert)]  # fmt: skip


def _primary_info_known(sentinel: redis.Redis) -> bool:
    state = sentinel.sentinel_master(MASTER)
    return isinstance(state, dict) and bool(state.get("runid"))


class TLSCluster(_Servers):
    """A TLS-only primary and one TLS-only Sentinel monitoring it (over TLS), on 127.0.0.1."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.tls = make_tls_files(directory, "redis")
        self.other_ca = make_tls_files(directory, "other-ca")  # a CA that did not sign it
        self.master_port, self.sentinel_port = _free_port(), _free_port()

    def _client(self, port: int, password: str | None = None) -> redis.Redis:
        return redis.Redis(port=port, password=password, ssl=True,
                           ssl_ca_certs=str(self.tls.cert), ssl_certfile=str(self.tls.cert),
                           ssl_keyfile=str(self.tls.key), decode_responses=True)  # fmt: skip

    def primary(self) -> redis.Redis:
        return self._client(self.master_port, PASSWORD)

    def start(self) -> None:
        master_dir = self._dir / "master"
        master_dir.mkdir()
        self._start("master", [*_tls_args(self.tls), "--tls-port", str(self.master_port),
                               "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                               "--dir", str(master_dir), "--requirepass", PASSWORD])  # fmt: skip
        conf = self._dir / "sentinel.conf"  # Sentinel rewrites its config: a file of its own
        conf.write_text(
            f"port 0\ntls-port {self.sentinel_port}\nbind 127.0.0.1\ndir {self._dir}\n"
            f"tls-cert-file {self.tls.cert}\ntls-key-file {self.tls.key}\n"
            f"tls-ca-cert-file {self.tls.cert}\n"
            # The Sentinel reaches the primary over TLS too, with its certificate as client's.
            "tls-replication yes\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel auth-pass {MASTER} {PASSWORD}\n"
        )
        self._start("sentinel", [str(conf), "--sentinel"])
        sentinel = self._client(self.sentinel_port)
        # The Sentinel has the primary's INFO (run id): its own TLS link to the primary works.
        _wait_until(partial(_primary_info_known, sentinel), self.procs, "sentinel")
        sentinel.close()

    def url(self, *, ca: Path | None = None, client_cert: bool = True) -> str:
        query = f"ssl_ca_certs={ca or self.tls.cert}&ssl_cert_reqs=required"
        if client_cert:
            query += f"&ssl_certfile={self.tls.cert}&ssl_keyfile={self.tls.key}"
        return (
            f"rediss+sentinel://:{URL_PASSWORD}@127.0.0.1:{self.sentinel_port}/{MASTER}/0?{query}"
        )


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSCluster]:
    cluster = TLSCluster(tmp_path_factory.mktemp("tls-sentinel"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _no_retry(url: str) -> Redis:
    # Errors at once: redis-py's default retries take ~3 s per Sentinel to give up.
    return connect(url, retry=Retry(NoBackoff(), 0))


@pytest.mark.parametrize("who", list(CLIENTS))
async def test_tls_sentinel_url_reaches_the_primary(who: str, tls_cluster: TLSCluster) -> None:
    client = CLIENTS[who](tls_cluster.url())
    try:
        await client.set(f"tls-{who}", "v")
        assert await client.get(f"tls-{who}") == b"v"
        # TLS to the primary itself (not only to the Sentinel), and the write landed there.
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["ssl_ca_certs"], kwargs["ssl_certfile"]) == (
            str(tls_cluster.tls.cert),
            str(tls_cluster.tls.cert),
        )
        primary = tls_cluster.primary()
        assert primary.get(f"tls-{who}") == "v"
        primary.close()
    finally:
        await client.aclose()


async def test_tls_sentinel_with_a_wrong_ca_is_a_clear_error(tls_cluster: TLSCluster) -> None:
    client = _no_retry(tls_cluster.url(ca=tls_cluster.other_ca.cert))
    try:
        # Each Sentinel's own error, not redis-py's bare `network:ConnectionError`.
        with pytest.raises(redis.exceptions.ConnectionError) as error:
            await client.get("k")
        message = str(error.value)
        assert f"No master found for '{MASTER}'" in message
        assert "certificate verify failed" in message
        assert f"127.0.0.1:{tls_cluster.sentinel_port}" in message
        assert isinstance(error.value.__cause__, redis.exceptions.ConnectionError)
    finally:
        await client.aclose()


async def test_tls_sentinel_without_a_client_certificate_is_refused(
    tls_cluster: TLSCluster,
) -> None:
    # The URL's client certificate is what lets the test above in. (TLS 1.3 reports the refusal
    # as an alert or as a reset, whichever the client reads first: only the address is certain.)
    client = _no_retry(tls_cluster.url(client_cert=False))
    try:
        with pytest.raises(redis.exceptions.ConnectionError) as error:
            await client.get("k")
        assert str(error.value).startswith(f"No master found for '{MASTER}': ")
        assert f"127.0.0.1:{tls_cluster.sentinel_port}" in str(error.value)
    finally:
        await client.aclose()


async def test_rediss_url_reads_the_same_parameters(tls_cluster: TLSCluster) -> None:
    # redis-py's own rediss:// URL, straight to the primary, with the same query string.
    query = tls_cluster.url().partition("?")[2]
    url = f"rediss://:{URL_PASSWORD}@127.0.0.1:{tls_cluster.master_port}/0?{query}"
    client = redis_client(make_settings(), url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
    wrong = url.replace(str(tls_cluster.tls.cert), str(tls_cluster.other_ca.cert), 1)
    client = _no_retry(wrong)
    try:
        with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
            await client.ping()
    finally:
        await client.aclose()
