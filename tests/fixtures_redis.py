"""Real redis-server fixtures (pytest plugin, loaded from tests/conftest.py).

`redis_url`: one server per test session; `redis_client`: a per-test async client that flushes the
database afterwards; `redis_server_factory`: extra, independent, restartable servers (AOF on).
`make_tls_files`: a throwaway certificate for TLS servers (`redis-server --tls-port`).
"""

import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import redis
from redis.asyncio import Redis

# Unix socket paths are limited to 108 bytes (sun_path) on Linux, terminating NUL included.
_MAX_SOCKET_PATH = 100
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0


def _redis_server_executable() -> str:
    path = shutil.which("redis-server")
    if path is None:
        # Never skip: a missing server would let CI pass without running the Redis tests.
        pytest.fail("redis-server not found: apt-get install redis-server")
    return path


class RedisServer:
    """A redis-server subprocess on a unix socket (no TCP, so no port races) in its own directory.

    `restart()` keeps the directory, so with `appendonly=True` the data survives it.
    """

    def __init__(
        self, directory: Path, *, appendonly: bool = False, requirepass: str | None = None
    ) -> None:
        self.directory = directory
        self.requirepass = requirepass
        self.socket = directory / "redis.sock"
        self.log = directory / "redis.log"
        if len(str(self.socket)) > _MAX_SOCKET_PATH:
            pytest.fail(f"unix socket path too long ({self.socket}); use a shorter --basetemp")
        self._args = [
            _redis_server_executable(),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--dir",
            str(directory),
            "--appendonly",
            "yes" if appendonly else "no",
            # fsync every write so even a SIGKILL loses nothing that was acknowledged.
            "--appendfsync",
            "always",
        ]
        if requirepass is not None:
            self._args += ["--requirepass", requirepass]
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @contextmanager
    def stalled(self) -> Iterator[None]:
        """SIGSTOPs the server for the block (commands queue up, then run on SIGCONT): a stall."""
        assert self._proc is not None, "redis-server is not running"
        self._proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._proc.send_signal(signal.SIGCONT)

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("redis-server already running")
        # Output goes to a file, never a PIPE: a full pipe would block the server.
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(self._args, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(self._proc)

    def stop(self, *, hard: bool = False) -> None:
        """Stops the server: SIGTERM (clean shutdown, AOF flushed) or, with `hard`, SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if hard:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, *, hard: bool = False) -> None:
        self.stop(hard=hard)
        self.start()

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        client = redis.Redis(
            unix_socket_path=str(self.socket), password=self.requirepass, socket_timeout=1.0
        )
        try:
            while True:
                if proc.poll() is not None:
                    self._proc = None
                    pytest.fail(
                        f"redis-server exited with {proc.returncode}:\n{self.log.read_text()}"
                    )
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop(hard=True)
                    pytest.fail(
                        f"redis-server not answering after {_START_TIMEOUT_S} s:\n"
                        f"{self.log.read_text()}"
                    )
                time.sleep(0.05)
        finally:
            client.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL (`unix://...`) of a private redis-server shared by the whole test session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest_asyncio.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    """An async client (bytes responses) on `redis_url`; the database is flushed afterwards."""
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()


class RedisServerFactory:
    """Starts independent redis-servers for one test and stops them all at teardown."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp_path_factory = tmp_path_factory
        self._servers: list[RedisServer] = []

    def __call__(self, *, appendonly: bool = True, requirepass: str | None = None) -> RedisServer:
        server = RedisServer(
            self._tmp_path_factory.mktemp("redis-extra"),
            appendonly=appendonly,
            requirepass=requirepass,
        )
        self._servers.append(server)
        server.start()
        return server

    def stop_all(self) -> None:
        for server in self._servers:
            server.stop()


@pytest.fixture
def redis_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerFactory]:
    """Call it to start a fresh redis-server (AOF on by default) that `restart()` keeps data of."""
    factory = RedisServerFactory(tmp_path_factory)
    try:
        yield factory
    finally:
        factory.stop_all()


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of a self-signed certificate for 127.0.0.1 and localhost. It is its own CA, so
    `cert` serves as the server's certificate, the CA file that verifies it, and a client
    certificate that the same CA file accepts."""

    cert: Path
    key: Path


def make_tls_files(directory: Path, name: str = "tls") -> TLSFiles:
    """Writes `<name>.crt` and `<name>.key` (one day, P-256: quick to make) with the openssl
    binary; skips the test without it (like tests/service/test_server.py)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl binary")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            *("-nodes", "-days", "1", "-keyout", str(key), "-out", str(cert)),
            *("-subj", f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return TLSFiles(cert, key)
