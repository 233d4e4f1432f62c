"""How a large text Append affects everyone else (issue #22): health-check and other-session latency
while one client streams `--mib` MiB of text to Append in `--chunk-mib` chunks.

The server is a real `lens-serve serve` process (the tiny model by default) on a private
redis-server; this process is the client. `--limits fit` (default) raises the server's upload
limits so that the whole text is read, tokenized and appended: the most work one upload can cause.
`--limits default` keeps the server's defaults, and the upload is refused once it passes them.

    python bench/upload.py [--mib 20] [--chunk-mib 1] [--model tiny] [--limits fit|default]

Prints a summary and writes bench/out/upload.json."""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lens_serve.store.embedded import EmbeddedRedis
from lens_serve.v1 import lens_serve_pb2 as pb
from lens_serve.v1 import lens_serve_pb2_grpc as pb_grpc

MIB = 1 << 20
START_TIMEOUT_S = 300.0
PROBE_TIMEOUT_S = 2.0  # a probe slower than this counts as timed out (K8s probes default to 1 s)


def stdlib_text(n_bytes: int) -> str:
    """`n_bytes` of ASCII from Python's standard library sources, in a fixed order."""
    parts, size = [], 0
    while size < n_bytes:
        for path in sorted(Path(inspect.__file__).parent.glob("*.py")):
            text = path.read_text(encoding="utf-8", errors="replace").encode("ascii", "replace")
            parts.append(text.decode())
            size += len(text)
            if size >= n_bytes:
                break
    return "".join(parts)[:n_bytes]


def rss_mib(pid: int) -> dict[str, float]:
    """The process's resident memory now and at its peak, MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def start_server(
    args: argparse.Namespace, redis_url: str, log: Path
) -> tuple[subprocess.Popen[str], str]:
    """The server process and its address, once it listens."""
    env = {
        **os.environ,
        # The tiny test engine's sizes; the upload path does not depend on them.
        "LENS_MAX_MODEL_LEN": "2048",
        "LENS_MAX_WC_BUDGET": "1024",
        "LENS_WC_BUDGET": "256",
        "LENS_TAIL": "32",
        "LENS_KV_CACHE_GIB": "0.5",
        "LENS_ENFORCE_EAGER": "true",
    }
    if args.limits == "fit":
        # Room for the whole text: a byte-level BPE token is at least one byte.
        env["LENS_MAX_APPEND_BYTES"] = str(args.mib * MIB)
        env["LENS_MAX_SESSION_TOKENS"] = str(args.mib * MIB)
    command = Path(sys.executable).with_name("lens-serve")
    argv = [str(command), "serve", "--model", args.model, "--port", "0", "--redis-url", redis_url]
    with log.open("w") as stderr:
        server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    assert server.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and server.poll() is None:
        if select.select([server.stdout], [], [], 1.0)[0]:
            line = server.stdout.readline()
            if line.startswith("listening on"):
                return server, line.split()[-1]
    server.kill()
    raise RuntimeError(f"lens-serve did not start; its log:\n{log.read_text()[-4000:]}")


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    """Seconds the call took; PROBE_TIMEOUT_S if it failed or timed out."""
    began = time.perf_counter()
    try:
        await call()
    except grpc.aio.AioRpcError:
        return PROBE_TIMEOUT_S
    return time.perf_counter() - began


async def probe(
    health: Any, stub: pb_grpc.LensServeAsyncStub, other: str, stop: asyncio.Event, interval: float
) -> dict[str, list[float]]:
    """Latencies (s) of health checks and of another session's GetSession, until `stop`."""
    check = functools.partial(
        health.Check, health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_S
    )
    get = functools.partial(
        stub.GetSession, pb.GetSessionRequest(session_id=other), timeout=PROBE_TIMEOUT_S
    )
    out: dict[str, list[float]] = {"health": [], "other_session": []}
    while not stop.is_set():
        out["health"].append(await timed(check))
        out["other_session"].append(await timed(get))
        await asyncio.sleep(interval)
    return out


def summary(latencies: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "n": len(latencies),
        "p50_ms": 1000 * cuts[49],
        "p99_ms": 1000 * cuts[98],
        "max_ms": 1000 * max(latencies),
        "timeouts": sum(x >= PROBE_TIMEOUT_S for x in latencies),
    }


async def measure(target: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    text = stdlib_text(args.mib * MIB)
    chunk_chars = int(args.chunk_mib * MIB)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.LensServeStub(channel)
        health: Any = health_pb2_grpc.HealthStub(channel)  # its stubs declare no methods
        session = (await stub.CreateSession(pb.CreateSessionRequest())).session_id
        other = (await stub.CreateSession(pb.CreateSessionRequest())).session_id
        idle = await probe_for(health, stub, other, seconds=2.0, interval=args.interval)
        rss_before = rss_mib(pid)

        def chunks() -> Iterator[pb.AppendRequest]:
            for i, start in enumerate(range(0, len(text), chunk_chars)):
                part = text[start : start + chunk_chars]
                yield pb.AppendRequest(session_id=session if i == 0 else "", text=part)

        def upload() -> tuple[str, int]:
            # The blocking client, in a thread: the asyncio one may report INTERNAL when the
            # server refuses an upload while it is still sending (grpc/grpc#36066).
            with grpc.insecure_channel(target) as sync_channel:
                try:
                    response = pb_grpc.LensServeStub(sync_channel).Append(chunks())
                except grpc.RpcError as e:
                    assert isinstance(e, grpc.Call)
                    return f"{e.code().name}: {e.details()}", 0
            return "OK", response.appended_tokens

        stop = asyncio.Event()
        prober = asyncio.create_task(probe(health, stub, other, stop, args.interval))
        began = time.perf_counter()
        status, appended = await asyncio.to_thread(upload)
        upload_s = time.perf_counter() - began
        stop.set()
        during = await prober
    return {
        "upload": {"mib": args.mib, "seconds": upload_s, "status": status, "tokens": appended},
        "during_upload": {name: summary(values) for name, values in during.items()},
        "idle": {name: summary(values) for name, values in idle.items()},
        "server_rss_mib": {"before": rss_before, "after": rss_mib(pid)},
    }


async def probe_for(
    health: Any, stub: pb_grpc.LensServeAsyncStub, other: str, seconds: float, interval: float
) -> dict[str, list[float]]:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    return await probe(health, stub, other, stop, interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--mib", type=int, default=20, help="text to upload, MiB")
    parser.add_argument("--chunk-mib", type=float, default=1.0, help="text per Append chunk")
    parser.add_argument("--limits", choices=["fit", "default"], default="fit")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between probes")
    parser.add_argument("--out", type=Path, default=Path("bench/out/upload.json"))
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="lens-bench-") as tmp,
        EmbeddedRedis(Path(tmp)) as redis,
    ):
        server, target = start_server(args, redis.url, Path(tmp) / "server.log")
        try:
            result = asyncio.run(measure(target, server.pid, args))
        finally:
            server.terminate()
            server.wait(60)
    during, rss = result["during_upload"], result["server_rss_mib"]
    print(
        f"upload of {args.mib} MiB: {result['upload']['status']} in "
        f"{result['upload']['seconds']:.1f} s, {result['upload']['tokens']} tokens; "
        f"health p50 {during['health']['p50_ms']:.1f} ms, p99 {during['health']['p99_ms']:.1f} ms, "
        f"max {during['health']['max_ms']:.1f} ms, {during['health']['timeouts']} timeouts of "
        f"{during['health']['n']}; other session p99 {during['other_session']['p99_ms']:.1f} ms; "
        f"server RSS {rss['before']['VmRSS']:.0f} -> {rss['after']['VmRSS']:.0f} MiB "
        f"(peak {rss['after']['VmHWM']:.0f})"
    )
    report = {"config": {k: str(v) for k, v in vars(args).items()}, "result": result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
