"""The production fault drill of issue #22: each fault run against real processes, one line each
saying whether what docs/design.md §7 promises held (`held`) or not (`FAILED`), with numbers.

A private redis-server (unix socket, `--appendonly yes --appendfsync everysec` as in
k8s/base/redis.conf) and a real `lens-serve serve --model tiny` process; this process is the client,
and it stops, stalls (SIGSTOP), kills and restores them. `make drill` runs it.

    python bench/faults.py [--only 1,5] [--out bench/out/faults.json]

Exits non-zero if any scenario failed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import grpc.aio
import redis
import redis.exceptions
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis
from upload import stdlib_text, summary  # bench/upload.py: the same upload, measured alone

from lens_serve.core.lensnet import LensNet, LensNetConfig
from lens_serve.service.config import Settings
from lens_serve.service.server import LENS_SERVE_SERVICE, OVERALL_HEALTH
from lens_serve.store.registry import GISTNET, LENSNET
from lens_serve.store.sessions import write_key
from lens_serve.v1 import lens_serve_pb2 as pb
from lens_serve.v1 import lens_serve_pb2_grpc as pb_grpc

_T = TypeVar("_T")

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
ADMIN_TOKEN = "drill-admin"
START_TIMEOUT_S = 300.0  # the tiny engine starts in 20-30 s on 2 quiet cores; shared ones vary
SCENARIO_TIMEOUT_S = 240.0
# Short outage settings, so that the drill sees in seconds what production sees in tens of them.
UNREADY_S = 3.0
SERVER_ENV = {
    # The tiny test engine's sizes (as bench/upload.py and the integration tests).
    "LENS_MAX_MODEL_LEN": "2048",
    "LENS_MAX_WC_BUDGET": "1024",
    "LENS_WC_BUDGET": "256",
    "LENS_TAIL": "32",
    "LENS_KV_CACHE_GIB": "0.5",
    "LENS_ENFORCE_EAGER": "true",
    "LENS_DRAIN_SECONDS": "1",
    "LENS_ADMIN_TOKEN": ADMIN_TOKEN,
    "LENS_LENS_UNREADY_SECONDS": str(UNREADY_S),
    "LENS_LENS_RETRY_SECONDS": "0.2",
    "LENS_LENS_RETRY_MAX_SECONDS": "1",
    "LENS_LENS_POLL_SECONDS": "0.5",
    # A stalled Redis fails a command after 1 s (production: 5 s), so stalls of a few seconds
    # are past it.
    "LENS_REDIS_SOCKET_TIMEOUT_S": "1",
    "LENS_REDIS_CONNECT_TIMEOUT_S": "1",
}
# Where the Makefile keeps caches and models (docs/design.md §5), for runs outside `make`.
CACHE_ENV = {
    "VLLM_CACHE_ROOT": str(ROOT / ".cache" / "vllm"),
    "TORCHINDUCTOR_CACHE_DIR": str(ROOT / ".cache" / "inductor"),
    "LENS_MODELS_DIR": str(ROOT / "models"),
    "HF_HUB_OFFLINE": "1",
}
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
VOCAB = (100, 3900)  # token ids the drill appends: inside the tiny model's 4k vocabulary


# --------------------------------------------------------------------------------------------------
# Processes


class RedisProcess:
    """redis-server on a unix socket in `directory`, restartable with its data kept."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.log = directory / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def aof_dir(self) -> Path:
        return self.directory / "appendonlydir"  # Redis 7's multi-part AOF

    def start(self) -> float:
        """Start and wait until it answers PING (its AOF replayed); returns the seconds taken."""
        began = time.monotonic()
        argv = [
            "redis-server", "--port", "0", "--unixsocket", str(self.socket),
            "--unixsocketperm", "700", "--dir", str(self.directory),
            "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "",  # no background snapshots: scenario 5 restores the AOF alone
        ]  # fmt: skip
        with self.log.open("ab") as log:  # a file, never a PIPE: a full pipe blocks the server
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1.0)
        try:
            while time.monotonic() - began < 30:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.log.read_text()[-2000:]}")
                with contextlib.suppress(redis.exceptions.RedisError):
                    if client.ping():
                        return time.monotonic() - began
                time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError("redis-server did not answer within 30 s")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM (AOF flushed, clean) or SIGKILL (as a crash), and wait for the exit."""
        if self.proc is None:
            return
        self.resume()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open, commands queue in its sockets and run on SIGCONT."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.paused:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False


class ServerProcess:
    """A `lens-serve serve --model tiny` process on a free port."""

    def __init__(self, redis_url: str, log: Path) -> None:
        self.redis_url = redis_url
        self.log = log
        self.proc: subprocess.Popen[str] | None = None
        self.target = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> float:
        """Start it and wait for its `listening on HOST:PORT` line; returns the seconds taken."""
        env = {**os.environ, **SERVER_ENV}
        for name, value in CACHE_ENV.items():
            env.setdefault(name, value)
        command = Path(sys.executable).with_name("lens-serve")
        argv = [str(command), "serve", "--model", "tiny", "--port", "0"]
        argv += ["--redis-url", self.redis_url]
        began = time.monotonic()
        with self.log.open("a") as stderr:
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
            )
        assert self.proc.stdout is not None
        while time.monotonic() - began < START_TIMEOUT_S and self.proc.poll() is None:
            if select.select([self.proc.stdout], [], [], 1.0)[0]:
                line = self.proc.stdout.readline()
                if line.startswith("listening on"):
                    self.target = line.split()[-1]
                    return time.monotonic() - began
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"lens-serve did not start; its log:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from the state field on (0 = state, 1 = ppid, 19 = start time)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def descendants(root: int) -> set[tuple[int, str]]:
    """(pid, start time) of every descendant of `root`; the start time tells a reused pid apart."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[tuple[int, str]] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if (fields := _stat(child)) is not None:
                found.add((child, fields[19]))
                todo.append(child)
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return "?"


def still_alive(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Those running: not gone, not a zombie, not a newer process under a reused pid."""
    alive = set()
    for pid, started in processes:
        fields = _stat(pid)
        if fields is not None and fields[0] not in ("Z", "X") and fields[19] == started:
            alive.add((pid, started))
    return alive


# --------------------------------------------------------------------------------------------------
# The drill's state and client helpers


@dataclass
class Outcome:
    held: bool
    detail: str
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass
class Drill:
    tmp: Path
    redis: RedisProcess
    server: ServerProcess
    hidden_size: int
    _channel: grpc.aio.Channel | None = None
    starts_s: list[float] = field(default_factory=list)
    retries: int = 0
    """UNAVAILABLE calls the drill's client retried (in the scenario running)."""

    def connect(self) -> None:
        limit = 16 << 20  # the server's max_message_bytes
        self._channel = grpc.aio.insecure_channel(
            self.server.target,
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
            ],
        )

    @property
    def channel(self) -> grpc.aio.Channel:
        assert self._channel is not None, "connect() first"
        return self._channel

    async def disconnect(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    @property
    def stub(self) -> pb_grpc.LensServeAsyncStub:
        return pb_grpc.LensServeStub(self.channel)

    @property
    def admin(self) -> pb_grpc.LensAdminAsyncStub:
        return pb_grpc.LensAdminStub(self.channel)

    @contextlib.asynccontextmanager
    async def raw(self) -> AsyncIterator[Redis]:
        """A fresh Redis client for raw writes (a pooled one would hold connections that a
        restart has closed)."""
        client = Redis.from_url(self.redis.url, socket_timeout=5.0)
        try:
            yield client
        finally:
            await client.aclose()

    async def health(self, name: str) -> str:
        """The health status of `name`, or the error code of the check."""
        stub: Any = health_pb2_grpc.HealthStub(self.channel)  # its stubs declare no methods
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=1.0)
        except grpc.aio.AioRpcError as e:
            return f"error {e.code().name}"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    async def lens_status(self) -> pb.LensStatus:
        return await self.admin.GetLensStatus(pb.GetLensStatusRequest(), metadata=ADMIN, timeout=5)

    async def retrying(self, call: Callable[[], Awaitable[_T]], seconds: float = 20.0) -> _T:
        """What §7 tells a client: retry UNAVAILABLE (not ready, Redis unreachable) with backoff.
        Each retry is counted in `retries`."""
        deadline = time.monotonic() + seconds
        delay = 0.1
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() + delay > deadline:
                    raise
            self.retries += 1
            await asyncio.sleep(delay)
            delay = min(2 * delay, 1.0)

    async def lifetime(self, session_id: str) -> int:
        reply = await self.retrying(
            lambda: self.stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=5)
        )
        return int(reply.lifetime_tokens)

    async def new_session(self, tokens: int = 0) -> str:
        session = await self.retrying(lambda: self.stub.CreateSession(pb.CreateSessionRequest()))
        if tokens:
            await self.append(session.session_id, ids(tokens, seed=len(session.session_id)))
        return session.session_id

    async def append(self, session_id: str, token_ids: list[int], key: str = "") -> int:
        """Append (one chunk); returns the lifetime the server reports."""
        request = pb.AppendRequest(session_id=session_id, token_ids=token_ids, idempotency_key=key)
        reply = await self.retrying(lambda: self.stub.Append(iter([request]), timeout=30))
        return int(reply.lifetime_tokens)

    async def generate(self, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
        return [r async for r in self.stub.Generate(request, timeout=60)]


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(*VOCAB) for _ in range(n)]


async def wait_until(check: Callable[[], Awaitable[bool]], seconds: float) -> float | None:
    """Seconds until `check()` held (polled every 0.1 s), or None if it did not within `seconds`."""
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        with contextlib.suppress(grpc.aio.AioRpcError, redis.exceptions.RedisError):
            if await check():
                return time.monotonic() - began
        await asyncio.sleep(0.1)
    return None


def short(version: str) -> str:
    return version[:12]


async def publish(d: Drill, seed: int, *, make_current: bool = True) -> str:
    """Publish a LensNet for the tiny model (as the trainer does); returns its version."""
    net = LensNet(LensNetConfig(hidden_size=d.hidden_size, seed=seed))
    async with d.raw() as r:
        return await LENSNET.publish(r, net, make_current=make_current)


async def wait_loaded(d: Drill, version: str, seconds: float = 30.0) -> float | None:
    async def loaded() -> bool:
        return (await d.lens_status()).loaded_version == version

    return await wait_until(loaded, seconds)


def plain_request(n: int = 40, max_tokens: int = 4) -> pb.GenerateRequest:
    """A Generate without a session: serving, whatever Redis holds."""
    return pb.GenerateRequest(
        prompt_token_ids=ids(n, seed=n), sampling=pb.SamplingParams(max_tokens=max_tokens)
    )


# --------------------------------------------------------------------------------------------------
# Scenarios


async def redis_restart(d: Drill) -> Outcome:
    """1. Redis restarts (data kept); a version published afterwards is hot-swapped in."""
    before = (await d.lens_status()).loaded_version
    began = time.monotonic()
    d.redis.stop()
    d.redis.start()
    down_s = time.monotonic() - began
    version = await publish(d, seed=101)
    waited = await wait_loaded(d, version)
    numbers = {"redis_down_s": down_s, "loaded_after_publish_s": waited, "version": version}
    if waited is None:
        status = await d.lens_status()
        return Outcome(
            False,
            f"published {short(version)} after a Redis restart; still running "
            f"{short(status.loaded_version)} 30 s later",
            numbers,
        )
    return Outcome(
        version != before,
        f"Redis restarted ({down_s:.1f} s down); {short(version)} published after it was loaded "
        f"in {waited:.1f} s",
        numbers,
    )


async def redis_down_readiness(d: Drill) -> Outcome:
    """2. Readiness NOT_SERVING while Redis is down past lens_unready_seconds, liveness SERVING."""
    probes: list[tuple[float, str, str]] = []  # (seconds since the stop, readiness, liveness)

    async def probe(since: float) -> tuple[str, str]:
        ready, live = await d.health(LENS_SERVE_SERVICE), await d.health(OVERALL_HEALTH)
        probes.append((time.monotonic() - since, ready, live))
        return ready, live

    stopped = time.monotonic()
    d.redis.stop()
    unready_at = None
    while time.monotonic() - stopped < UNREADY_S + 10:
        ready, _ = await probe(stopped)
        if ready == "NOT_SERVING" and unready_at is None:
            unready_at = time.monotonic() - stopped
        if unready_at is not None and time.monotonic() - stopped > unready_at + 1.0:
            break  # seen NOT_SERVING for a second: enough
        await asyncio.sleep(0.1)
    down_probes = len(probes)
    started = time.monotonic()
    d.redis.start()
    ready_at = None
    while time.monotonic() - started < 30:
        ready, _ = await probe(started)
        if ready == "SERVING":
            ready_at = time.monotonic() - started
            break
        await asyncio.sleep(0.1)
    live_bad = [(round(t, 2), live) for t, _, live in probes if live != "SERVING"]
    numbers = {
        "unready_seconds_setting": UNREADY_S,
        "not_serving_after_stop_s": unready_at,
        "serving_after_start_s": ready_at,
        "probes": len(probes),
        "liveness_not_serving": live_bad,
    }
    parts = [
        f"readiness NOT_SERVING {unready_at:.1f} s after Redis stopped (limit {UNREADY_S:.0f} s)"
        if unready_at is not None
        else f"readiness never NOT_SERVING in {UNREADY_S + 10:.0f} s of {down_probes} probes",
        f"SERVING {ready_at:.1f} s after it started again"
        if ready_at is not None
        else "not SERVING 30 s after it started again",
        f"liveness SERVING at all {len(probes)} probes"
        if not live_bad
        else f"liveness {live_bad[0][1]} at {len(live_bad)} probes",
    ]
    held = unready_at is not None and ready_at is not None and not live_bad
    return Outcome(held, "; ".join(parts), numbers)


def _config_list_record() -> dict[str, str | bytes]:
    weights = b"not safetensors"
    return {
        "safetensors": weights,
        "sha256": hashlib.sha256(weights).hexdigest(),
        "config": "[]",
        "metrics": "{}",
        "created_at": repr(time.time()),
        "parent": "",
    }


async def malformed_record(d: Drill) -> Outcome:
    """3. lens:current names malformed records: rejected, the loaded version keeps serving."""
    loaded = (await d.lens_status()).loaded_version
    records: dict[str, dict[str, str | bytes]] = {
        "drill-config-list": _config_list_record(),
        "drill-sha256-only": {"sha256": "0" * 64},
    }
    problems, reasons = [], {}
    for name, fields in records.items():
        async with d.raw() as r:
            await r.hset(LENSNET.key(name), mapping=fields)  # type: ignore[arg-type]
            await r.set(LENSNET.current_key, name)
            await r.publish(LENSNET.events_channel, name)
        await asyncio.sleep(2.0)  # four polls and the announcement
        status = await d.lens_status()
        reasons[name] = status.not_current_reason
        replies = await d.generate(plain_request())
        if not d.server.alive():
            problems.append(f"{name}: the server exited")
            break
        if status.loaded_version != loaded:
            problems.append(f"{name}: loaded {short(status.loaded_version)}")
        if name not in status.not_current_reason:
            problems.append(f"{name}: not_current_reason {status.not_current_reason!r}")
        if replies[-1].usage.lens_version != loaded:
            problems.append(f"{name}: Generate ran {short(replies[-1].usage.lens_version)}")
        if await d.health(LENS_SERVE_SERVICE) != "SERVING":
            problems.append(f"{name}: not ready")
    version = await publish(d, seed=303)
    waited = await wait_loaded(d, version)
    if waited is None:
        problems.append(f"valid {short(version)} not loaded in 30 s")
    numbers = {"not_current_reason": reasons, "valid_loaded_after_s": waited}
    if problems:
        return Outcome(False, "; ".join(problems), numbers)
    return Outcome(
        True,
        f"2 malformed records named current: rejected, {short(loaded)} kept serving, server alive "
        f"and ready; a valid version then loaded in {waited:.1f} s",
        numbers,
    )


async def unloadable_current_at_start(d: Drill) -> Outcome:
    """4. The server restarts while lens:current is a torn record and lens:gistnet:current is
    malformed: it starts, runs the newest loadable version and says why."""
    fallback = await publish(d, seed=401, make_current=False)
    torn = await publish(d, seed=402, make_current=False)
    async with d.raw() as r:
        # An interrupted publish: the version's hash without most of its fields.
        await r.hdel(LENSNET.key(torn), "config", "metrics", "created_at", "parent")
        await r.set(LENSNET.current_key, torn)
        await r.hset(GISTNET.key("drill-bad"), mapping={"config": "[]", "sha256": "x"})
        await r.set(GISTNET.current_key, "drill-bad")
    d.server.stop()
    await d.disconnect()
    try:
        start_s = await asyncio.to_thread(d.server.start)
    except RuntimeError as e:
        return Outcome(False, f"the server did not start: {str(e)[-300:]}")
    d.starts_s.append(start_s)
    d.connect()
    await asyncio.sleep(3.0)  # a crash right after start would show now
    status = await d.lens_status()
    info = {v.version: v.unloadable_reason for v in status.version_info}
    replies = await d.generate(plain_request())
    problems = []
    if not d.server.alive():
        problems.append("the server exited after starting")
    if status.loaded_version != fallback:
        problems.append(f"runs {short(status.loaded_version)}, not {short(fallback)}")
    if torn not in status.not_current_reason:
        problems.append(f"not_current_reason {status.not_current_reason!r}")
    if not info.get(torn):
        problems.append("the torn version has no unloadable_reason")
    usage = replies[-1].usage
    if usage.lens_version != fallback:
        problems.append(f"Generate ran {short(usage.lens_version)}")
    if usage.gistnet_version == "drill-bad":
        problems.append("runs the malformed GistNet")
    async with d.raw() as r:  # leave a loadable current for the scenarios after this one
        await r.delete(GISTNET.current_key)
        await LENSNET.set_current(r, fallback)
    numbers = {
        "start_s": start_s,
        "loaded_version": status.loaded_version,
        "not_current_reason": status.not_current_reason,
        "torn_unloadable_reason": info.get(torn, ""),
        "gistnet_version": usage.gistnet_version,
    }
    if problems:
        return Outcome(False, "; ".join(problems), numbers)
    return Outcome(
        True,
        f"restarted in {start_s:.0f} s, alive 3 s later, runs the newest loadable "
        f"{short(fallback)} and GistNet {usage.gistnet_version} (the malformed one skipped); "
        f"not_current_reason: {status.not_current_reason[:100]}...",
        numbers,
    )


async def redis_data_loss(d: Drill) -> Outcome:
    """5. Redis comes back from an older copy of its data: the server follows the log, not its
    cached tree."""
    sid = await d.new_session()
    await d.append(sid, ids(640, seed=5))
    await asyncio.sleep(1.5)  # past one appendfsync everysec
    snapshot = d.tmp / "aof-snapshot"
    shutil.copytree(d.redis.aof_dir, snapshot)
    await d.append(sid, ids(320, seed=6))
    request = pb.GetWorkingContextRequest(session_id=sid)
    cached = (await d.stub.GetWorkingContext(request, timeout=30)).lifetime_tokens
    d.redis.stop(signal.SIGKILL)
    shutil.rmtree(d.redis.aof_dir)
    shutil.copytree(snapshot, d.redis.aof_dir)
    d.redis.start()
    log = await d.lifetime(sid)
    wc = await d.retrying(lambda: d.stub.GetWorkingContext(request, timeout=30))
    after_loss = wc.lifetime_tokens
    appended = await d.append(sid, ids(100, seed=7))
    wc2 = await d.stub.GetWorkingContext(request, timeout=30)
    replies = await d.generate(
        pb.GenerateRequest(
            session_id=sid,
            prompt_token_ids=ids(16, seed=8),
            sampling=pb.SamplingParams(max_tokens=8),
        )
    )
    final = replies[-1]
    now = await d.lifetime(sid)
    numbers = {
        "cached_before_loss": cached,
        "log_after_loss": log,
        "wc_lifetime_after_loss": after_loss,
        "log_after_append": appended,
        "wc_lifetime_after_append": wc2.lifetime_tokens,
        "wc_last_span_end": wc2.spans[-1].end if wc2.spans else None,
        "generate_finish": final.finish_reason,
        "log_after_generate": now,
    }
    expected_end = appended + 16 + final.usage.completion_tokens
    held = (
        cached == 960
        and log == 640
        and after_loss == 640
        and wc2.lifetime_tokens == appended == 740
        and (wc2.spans[-1].end if wc2.spans else 0) == 740
        and bool(final.finish_reason)
        and final.usage.lifetime_tokens == appended + 16
        and now == expected_end
    )
    return Outcome(
        held,
        f"server cached {cached}, Redis came back with {log}: working context then covers "
        f"{after_loss} (not {cached}), {wc2.lifetime_tokens} after 100 more; Generate finished "
        f"({final.finish_reason or 'no finish reason'}), log {now} = {appended} + 16 + "
        f"{final.usage.completion_tokens}",
        numbers,
    )


async def _stalled_append(d: Drill, sid: str, token_ids: list[int], key: str) -> tuple[str, int]:
    """An Append whose write reaches Redis while it is stalled: the server has read the first
    chunk (and checked the session) before the stall, and the stream ends during it. Returns the
    call's status and the session's lifetime once Redis runs again."""
    go = asyncio.Event()

    async def chunks() -> AsyncIterator[pb.AppendRequest]:
        yield pb.AppendRequest(session_id=sid, token_ids=token_ids, idempotency_key=key)
        await go.wait()

    call = d.stub.Append(chunks(), timeout=3.0)
    await asyncio.sleep(0.5)
    d.redis.pause()
    go.set()
    try:
        await call
        status = "OK"
    except grpc.aio.AioRpcError as e:
        status = e.code().name
    await asyncio.sleep(0.5)
    d.redis.resume()
    await asyncio.sleep(1.5)  # Redis runs what was queued in its sockets
    return status, await d.lifetime(sid)


async def ambiguous_append(d: Drill) -> Outcome:
    """6. An Append that fails while Redis is stalled, retried: once with a key, twice without."""
    n = 100
    results: dict[str, dict[str, Any]] = {}
    for key in ("drill-append-1", ""):
        sid = await d.new_session()
        base = await d.append(sid, ids(64, seed=9))  # also loads the append script into Redis
        chunk = ids(n, seed=10)
        status, after_stall = await _stalled_append(d, sid, chunk, key)
        retried = await d.append(sid, chunk, key)
        results["with_key" if key else "without_key"] = {
            "first_call": status,
            "applied_after_failure": after_stall - base,
            "after_retry": retried - base,
        }
    keyed, unkeyed = results["with_key"], results["without_key"]
    held = keyed["after_retry"] == n and keyed["first_call"] != "OK"
    exercised = keyed["applied_after_failure"] == n
    detail = (
        f"with a key: first call {keyed['first_call']}, Redis applied "
        f"{keyed['applied_after_failure']} of {n} tokens after it failed, after the retry the "
        f"session holds {keyed['after_retry']} ({keyed['after_retry'] / n:.0f}x); without: "
        f"{unkeyed['first_call']}, then {unkeyed['after_retry']} "
        f"({unkeyed['after_retry'] / n:.0f}x)"
    )
    if not exercised:
        detail += " (the stalled write was not applied: the ambiguity did not arise)"
    return Outcome(held, detail, results)


async def _stalled_turn(d: Drill, key: str, stall_at: int) -> dict[str, Any]:
    """A session turn (256 tokens asked for) with idempotency `key`, Redis stalled once the client
    has `stall_at` tokens of it; the call fails, Redis runs again, the turn is retried with the
    key. What the session's log and the key's write record hold then."""
    max_tokens = 256
    sid = await d.new_session()
    base = await d.append(sid, ids(64, seed=11))
    prompt = ids(20, seed=12)
    request = pb.GenerateRequest(
        session_id=sid,
        prompt_token_ids=prompt,
        sampling=pb.SamplingParams(max_tokens=max_tokens),
        idempotency_key=key,
    )
    call = d.stub.Generate(request, timeout=6.0)
    received = 0
    try:
        async for chunk in call:
            received += len(chunk.token_ids)
            if received >= stall_at and not d.redis.paused:
                d.redis.pause()  # the answer is stored after the last token: that stalls
        first_call = "OK"
    except grpc.aio.AioRpcError as e:
        first_call = e.code().name
    await asyncio.sleep(0.5)
    d.redis.resume()
    await asyncio.sleep(1.5)  # Redis runs what was queued in its sockets
    after_stall = await d.lifetime(sid)
    replies = await d.generate(request)
    final = replies[-1]
    answer = sum(len(r.token_ids) for r in replies)
    lifetime = await d.lifetime(sid)
    async with d.raw() as r:
        raw = cast(dict[bytes, bytes], await r.hgetall(write_key(sid, key)))
    record = {k.decode(): v.decode() for k, v in raw.items()}
    spans = {
        part: tuple(int(x) // 4 for x in record[part].split())  # bytes of int32 ids
        for part in ("prompt", "answer")
        if part in record
    }
    held = (
        first_call != "OK"
        and lifetime == base + len(prompt) + answer
        and spans.get("prompt") == (base, base + len(prompt))
        and spans.get("answer") == (base + len(prompt), lifetime)
        and bool(final.finish_reason)
    )
    return {
        "held": held,
        "first_call": first_call,
        "first_call_tokens": received,
        "base": base,
        "prompt": len(prompt),
        "log_after_stall": after_stall,
        "replayed": final.usage.replayed,
        "answer_tokens": answer,
        "log_after_retry": lifetime,
        "write_record": spans,
    }


async def ambiguous_generate(d: Drill) -> Outcome:
    """7. A session Generate whose answer is being stored when Redis stalls, retried with its key:
    the prompt is stored once and one answer. Twice: Redis stalled after the first token (the
    answer's write usually never reaches it), and a few tokens before the end (it usually does,
    and runs after the call failed: the retry is replayed)."""
    turns = {
        "stall_after_first_token": await _stalled_turn(d, "drill-turn-1", stall_at=1),
        "stall_near_the_end": await _stalled_turn(d, "drill-turn-2", stall_at=250),
    }
    parts = []
    for label, turn in zip(("stalled after token 1", "near the end"), turns.values(), strict=True):
        how = "replayed" if turn["replayed"] else "generated again"
        parts.append(
            f"{label}: first call {turn['first_call']} after {turn['first_call_tokens']} "
            f"tokens, log {turn['log_after_stall']} once Redis ran, the retry {how}: log "
            f"{turn['log_after_retry']} = {turn['base']} + prompt {turn['prompt']} + answer "
            f"{turn['answer_tokens']}"
        )
    return Outcome(all(t["held"] for t in turns.values()), "; ".join(parts), turns)


async def largest_upload(d: Drill, mib: int = 20, chunk_mib: int = 1) -> Outcome:
    """8. 20 MiB of text to Append in 1 MiB chunks: health stays fast, the limits are kept."""
    default = Settings.model_fields["max_append_bytes"].default
    limit = int(os.environ.get("LENS_MAX_APPEND_BYTES", default))  # what the server reads
    text = stdlib_text(mib * MIB)
    sid = await d.new_session()
    target = d.server.target

    def chunks() -> Iterator[pb.AppendRequest]:
        step = chunk_mib * MIB
        for i, start in enumerate(range(0, len(text), step)):
            yield pb.AppendRequest(
                session_id=sid if i == 0 else "", text=text[start : start + step]
            )

    def upload() -> str:
        # The blocking client in a thread: the asyncio one may report INTERNAL when the server
        # refuses an upload while it is still sending (grpc/grpc#36066).
        options = [("grpc.max_send_message_length", 16 << 20)]
        with grpc.insecure_channel(target, options=options) as channel:
            try:
                pb_grpc.LensServeStub(channel).Append(chunks(), timeout=300)
            except grpc.RpcError as e:
                assert isinstance(e, grpc.Call)
                return str(e.code().name)
        return "OK"

    latencies: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        stub: Any = health_pb2_grpc.HealthStub(d.channel)
        while not done.is_set():
            began = time.perf_counter()
            try:
                await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                latencies.append(time.perf_counter() - began)
            except grpc.aio.AioRpcError:
                latencies.append(2.0)
            await asyncio.sleep(0.05)

    prober = asyncio.create_task(probe())
    began = time.monotonic()
    status = await asyncio.to_thread(upload)
    upload_s = time.monotonic() - began
    done.set()
    await prober
    lifetime = await d.lifetime(sid)
    stats = summary(latencies)
    expected = "RESOURCE_EXHAUSTED" if len(text.encode()) > limit else "OK"
    numbers = {
        "upload_s": upload_s,
        "status": status,
        "expected": expected,
        "lifetime_after": lifetime,
        "health": stats,
    }
    held = (
        status == expected
        and (lifetime == 0 if expected != "OK" else lifetime > 0)
        and stats["p99_ms"] < 100
    )
    return Outcome(
        held,
        f"{mib} MiB upload {status} in {upload_s:.1f} s (max_append_bytes {limit // MIB} MiB: "
        f"{expected} expected), {lifetime} tokens appended; health p50 {stats['p50_ms']:.1f} ms, "
        f"p99 {stats['p99_ms']:.1f} ms, max {stats['max_ms']:.0f} ms over {stats['n']} probes "
        "(p99 target < 100 ms)",
        numbers,
    )


async def client_input_in_errors(d: Drill) -> Outcome:
    """9. A 10 kB session id and a session id only on a later chunk: INVALID_ARGUMENT, short
    messages, nothing appended."""
    long_id = "0123456789abcdef" * 640  # 10 kB
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "GetSession": lambda: d.stub.GetSession(pb.GetSessionRequest(session_id=long_id)),
        "Append": lambda: d.stub.Append(iter([pb.AppendRequest(session_id=long_id, text="x")])),
        "Generate": lambda: d.generate(
            pb.GenerateRequest(session_id=long_id, prompt="x", idempotency_key="k")
        ),
    }
    seen: dict[str, tuple[str, int]] = {}
    for name, call in calls.items():
        try:
            await call()
            seen[name] = ("OK", 0)
        except grpc.aio.AioRpcError as e:
            seen[name] = (e.code().name, len(e.details() or ""))
    sid = await d.new_session(tokens=8)
    late = [pb.AppendRequest(text="first chunk"), pb.AppendRequest(session_id=sid, text="second")]
    try:
        await d.stub.Append(iter(late), timeout=10)
        late_status, late_len = "OK", 0
    except grpc.aio.AioRpcError as e:
        late_status, late_len = e.code().name, len(e.details() or "")
    lifetime = await d.lifetime(sid)
    numbers = {
        "long_id": {k: {"status": s, "message_chars": n} for k, (s, n) in seen.items()},
        "late_session_id": {"status": late_status, "message_chars": late_len, "lifetime": lifetime},
    }
    held = (
        all(s == "INVALID_ARGUMENT" and n < 512 for s, n in seen.values())
        and late_status == "INVALID_ARGUMENT"
        and lifetime == 8
    )
    listed = ", ".join(f"{k} {s} ({n} chars)" for k, (s, n) in seen.items())
    return Outcome(
        held,
        f"10 kB session_id: {listed}; session_id only on chunk 2: {late_status}, session "
        f"{lifetime} tokens (8 before)",
        numbers,
    )


async def engine_dies_with_server(d: Drill) -> Outcome:
    """10. A SIGKILLed server leaves no process behind (its vLLM engine core among them)."""
    children = descendants(d.server.pid)
    names = sorted({_comm(pid) for pid, _ in still_alive(children)})
    killed = time.monotonic()
    d.server.stop(signal.SIGKILL)
    gone_s = None
    while time.monotonic() - killed < 15:
        if not still_alive(children):
            gone_s = time.monotonic() - killed
            break
        await asyncio.sleep(0.1)
    left = still_alive(children)
    for pid, _ in left:  # orphans of a failed run: ours to end
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    numbers = {"descendants": len(children), "names": names, "gone_after_s": gone_s}
    if not children:
        return Outcome(False, "the server had no child processes to watch", numbers)
    if gone_s is None:
        return Outcome(
            False, f"{len(left)} of {len(children)} descendants alive after 15 s", numbers
        )
    return Outcome(
        True,
        f"all {len(children)} descendants ({', '.join(names)}) gone {gone_s:.1f} s after SIGKILL",
        numbers,
    )


SCENARIOS: list[tuple[str, Callable[[Drill], Awaitable[Outcome]]]] = [
    ("redis restart", redis_restart),
    ("readiness while redis down", redis_down_readiness),
    ("malformed record", malformed_record),
    ("restart, unloadable current", unloadable_current_at_start),
    ("redis data loss", redis_data_loss),
    ("ambiguous append", ambiguous_append),
    ("ambiguous generate", ambiguous_generate),
    ("largest upload", largest_upload),
    ("client input in errors", client_input_in_errors),
    ("engine dies with server", engine_dies_with_server),
]


# --------------------------------------------------------------------------------------------------
# Main


def tiny_hidden_size() -> int:
    models = Path(os.environ.get("LENS_MODELS_DIR", CACHE_ENV["LENS_MODELS_DIR"]))
    config = models / "tiny" / "config.json"
    if not config.exists():
        command = Path(sys.executable).with_name("lens-serve")
        env = {**os.environ, "LENS_MODELS_DIR": str(models)}
        subprocess.run([str(command), "models", "prepare", "tiny"], check=True, env=env)
    return int(json.loads(config.read_text())["hidden_size"])


async def run(d: Drill, chosen: Sequence[int]) -> list[dict[str, Any]]:
    d.redis.start()
    d.starts_s.append(await asyncio.to_thread(d.server.start))
    d.connect()
    print(f"server up in {d.starts_s[0]:.0f} s at {d.server.target}; redis {d.redis.url}")
    results = []
    for number, (name, scenario) in enumerate(SCENARIOS, 1):
        if number not in chosen:
            continue
        began = time.monotonic()
        d.retries = 0
        if not d.server.alive():
            outcome = Outcome(False, "not run: the server is not running")
        else:
            try:
                outcome = await asyncio.wait_for(scenario(d), SCENARIO_TIMEOUT_S)
            except Exception as e:  # a scenario that breaks is a failed one; the drill goes on
                outcome = Outcome(False, f"raised {type(e).__name__}: {str(e)[:300]}")
            finally:
                d.redis.resume()
        seconds = time.monotonic() - began
        if d.retries:
            outcome.detail += f" (the client retried UNAVAILABLE {d.retries}x)"
        verdict = "held" if outcome.held else "FAILED"
        print(f"{number:>2} {name:<28} {verdict:<6} {outcome.detail}", flush=True)
        results.append(
            {
                "scenario": number,
                "name": name,
                "held": outcome.held,
                "detail": outcome.detail,
                "seconds": seconds,
                "client_retries": d.retries,
                "numbers": outcome.numbers,
            }
        )
    await d.disconnect()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated scenario numbers (default all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "faults.json")
    args = parser.parse_args()
    chosen = [int(n) for n in args.only.split(",")] if args.only else range(1, len(SCENARIOS) + 1)
    hidden_size = tiny_hidden_size()
    began = time.monotonic()
    # A short path: unix socket paths are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="lens-drill-", dir="/tmp") as tmp:
        redis_proc = RedisProcess(Path(tmp))
        server = ServerProcess(redis_proc.url, Path(tmp) / "server.log")
        drill = Drill(Path(tmp), redis_proc, server, hidden_size)
        try:
            results = asyncio.run(run(drill, list(chosen)))
        finally:
            server.stop()
            redis_proc.stop()
            log_copy = args.out.with_suffix(".server.log")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            if server.log.exists():
                shutil.copy(server.log, log_copy)
    total_s = time.monotonic() - began
    failed = [r["scenario"] for r in results if not r["held"]]
    print(
        f"{len(results) - len(failed)} of {len(results)} held in {total_s:.0f} s"
        + (f"; FAILED: {', '.join(map(str, failed))}" if failed else "")
    )
    report = {
        "config": {"server_env": SERVER_ENV, "server_starts_s": drill.starts_s},
        "total_s": total_s,
        "scenarios": results,
    }
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out} (server log: {log_copy})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
