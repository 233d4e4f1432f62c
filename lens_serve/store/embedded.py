"""A private `redis-server` subprocess: the default store when no Redis URL is configured.

It listens only on a unix socket in a private temporary directory (no TCP port, so nothing else on
the machine can reach it or race for it) and appends every write to an AOF in a data directory
that outlives it, so a restarted lens-serve finds its sessions and weights again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import redis
import redis.exceptions

logger = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(".cache") / "redis"
"""Relative to the working directory, like the project's other caches."""
LOG_NAME = "redis.log"
LOCK_NAME = "lens-redis.lock"
_SOCKET_NAME = "redis.sock"
# A cold start with an empty AOF takes ~10 ms; replaying a large AOF can take seconds.
_START_TIMEOUT_S = 30.0
_POLL_INTERVAL_S = 0.05
# redis-server flushes its AOF on SIGTERM; a few seconds is plenty for that.
_STOP_TIMEOUT_S = 10.0
_LOG_TAIL_CHARS = 4000


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be started."""


class EmbeddedRedis:
    """Starts and stops a private redis-server. Use as a (sync or async) context manager::

        async with EmbeddedRedis() as server:
            client = redis.asyncio.Redis.from_url(server.url)

    `data_dir` (default ./.cache/redis) holds the AOF and the server log; one embedded server at a
    time may use it (a lock file guards it, held by the redis-server process too, so a server left
    behind by a killed parent still blocks a second one from corrupting the AOF).
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        executable: str | None = None,
        start_timeout_s: float = _START_TIMEOUT_S,
    ) -> None:
        self.data_dir = (
            data_dir if data_dir is not None else Path.cwd() / DEFAULT_DATA_DIR
        ).resolve()
        self.log_path = self.data_dir / LOG_NAME
        self._executable = executable
        self._start_timeout_s = start_timeout_s
        self._run_dir: Path | None = None
        self._lock: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        if self._run_dir is None:
            raise EmbeddedRedisError("embedded redis-server is not running")
        return self._run_dir / _SOCKET_NAME

    @property
    def url(self) -> str:
        """`unix://<socket>` of the running server (bytes responses unless the client asks)."""
        return f"unix://{self.socket_path}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Starts the server and waits until it answers PING (blocking; see `__aenter__`)."""
        if self._proc is not None:
            raise EmbeddedRedisError("embedded redis-server already started")
        executable = self._executable or shutil.which("redis-server")
        if executable is None:
            raise EmbeddedRedisError(
                "redis-server not found on PATH: install it (apt-get install redis-server) or "
                "give a Redis URL (--redis-url / LENS_REDIS_URL)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = self._acquire_lock()
        try:
            # mkdtemp makes the directory 0700: only this user can reach the socket.
            self._run_dir = Path(tempfile.mkdtemp(prefix="lens-redis-"))
            self._spawn(executable)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        logger.info("embedded redis-server up: %s (data in %s)", self.url, self.data_dir)

    def stop(self) -> None:
        """Stops the server (SIGTERM flushes the AOF; SIGKILL after a timeout). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("embedded redis-server ignored SIGTERM for %.0f s", _STOP_TIMEOUT_S)
                proc.kill()
                proc.wait()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None
        if self._lock is not None:
            self._lock.close()  # releases the flock (the server process has exited)
            self._lock = None
        if proc is not None:
            logger.info("embedded redis-server stopped (exit status %s)", proc.returncode)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    # ---- internals -------------------------------------------------------------------------------

    def _acquire_lock(self) -> IO[bytes]:
        lock = (self.data_dir / LOCK_NAME).open("ab")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise EmbeddedRedisError(
                f"{self.data_dir} is in use by another embedded redis-server (lock "
                f"{LOCK_NAME}); stop it, or use another data directory or a Redis URL"
            ) from None
        return lock

    def _spawn(self, executable: str) -> None:
        assert self._run_dir is not None and self._lock is not None
        args = [
            executable,
            "--port",
            "0",  # no TCP listener at all
            "--unixsocket",
            str(self._run_dir / _SOCKET_NAME),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",  # durable sessions across restarts
            "--appendfsync",
            "everysec",  # a crash loses at most ~1 s of writes; fsync per write costs latency
            "--save",
            "",  # no RDB snapshots: the AOF is the only persistence
            "--daemonize",
            "no",
            "--logfile",
            "",  # log to stdout, which goes to the log file below
        ]
        # The log goes to a file, never a PIPE: a full pipe would block the server.
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # The server inherits the lock so a leftover server still holds it.
                pass_fds=(self._lock.fileno(),),
                # Own session: a terminal's Ctrl-C reaches only lens-serve, which drains its
                # in-flight calls (still using Redis) and stops this server last.
                start_new_session=True,
            )

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._start_timeout_s
        client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1.0)
        try:
            while True:
                if self._proc.poll() is not None:
                    raise EmbeddedRedisError(
                        f"redis-server exited with status {self._proc.returncode}; "
                        f"{self.log_path}:\n{self._log_tail()}"
                    )
                with contextlib.suppress(
                    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError
                ):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(
                        f"redis-server not answering after {self._start_timeout_s:.0f} s; "
                        f"{self.log_path}:\n{self._log_tail()}"
                    )
                time.sleep(_POLL_INTERVAL_S)
        finally:
            client.close()

    def _log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _LOG_TAIL_CHARS))
                return f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
