"""build_server (ports, TLS, health, reflection), the servicers that answer while the model loads,
and the `lens-serve serve` command line (flags, env, validation). No engine here: the process-level
test with the real engine is an integration test."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lens_serve.client import LensClient
from lens_serve.log import configure_logging
from lens_serve.service import server
from lens_serve.service.config import Settings
from lens_serve.tools import cli
from lens_serve.v1 import lens_serve_pb2 as pb
from lens_serve.v1 import lens_serve_pb2_grpc as pb_grpc
from tests.fake_servicers import (
    FakeAdminServicer,
    FakeServeServicer,
    make_settings,
    running_fake_server,
)


async def test_build_server_port_zero_returns_bound_port() -> None:
    async with running_fake_server(make_settings(port=0)) as fake:
        port = int(fake.target.rsplit(":", 1)[1])
        assert port > 0
        async with LensClient(fake.target) as client:
            assert (await client.get_session("x")).lifetime_tokens == 7


async def test_build_server_port_in_use_raises() -> None:
    async with running_fake_server(make_settings()) as fake:
        port = int(fake.target.rsplit(":", 1)[1])
        with pytest.raises(RuntimeError, match="bind"):
            server.build_server(
                make_settings(host="127.0.0.1", port=port),
                serve_servicer=FakeServeServicer(),
                admin_servicer=FakeAdminServicer(),
                health=health.aio.HealthServicer(),
            )


async def test_build_server_reflection_lists_services() -> None:
    async with (
        running_fake_server(make_settings()) as fake,
        grpc.aio.insecure_channel(fake.target) as channel,
    ):
        # The published stubs type this stub for sync channels only.
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {
        "lens_serve.v1.LensServe",
        "lens_serve.v1.LensAdmin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """(cert, key) PEM files of a one-day self-signed certificate for 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl binary")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_build_server_tls_when_cert_and_key_set(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    settings = make_settings(tls_cert=cert, tls_key=key)
    async with running_fake_server(settings) as fake:
        async with LensClient(fake.target, root_certificates=cert.read_bytes()) as client:
            assert (await client.get_session("x")).lifetime_tokens == 7
        async with LensClient(fake.target, timeout=2) as plaintext:
            with pytest.raises(grpc.aio.AioRpcError):
                await plaintext.get_session("x")


# ---- while loading ---------------------------------------------------------------------------


@pytest.fixture
async def deferred() -> AsyncIterator[tuple[str, Any, Any]]:
    descriptors = pb.DESCRIPTOR.services_by_name
    serve_proxy = server._deferred_servicer(pb_grpc.LensServeServicer, descriptors["LensServe"])
    admin_proxy = server._deferred_servicer(pb_grpc.LensAdminServicer, descriptors["LensAdmin"])
    grpc_server, port = server.build_server(
        make_settings(host="127.0.0.1", port=0),
        serve_servicer=cast(pb_grpc.LensServeServicer, serve_proxy),
        admin_servicer=cast(pb_grpc.LensAdminServicer, admin_proxy),
        health=health.aio.HealthServicer(),
    )
    await grpc_server.start()
    try:
        yield f"127.0.0.1:{port}", serve_proxy, admin_proxy
    finally:
        await grpc_server.stop(grace=None)


async def test_deferred_servicer_unavailable_until_bound(deferred: tuple[str, Any, Any]) -> None:
    target, serve_proxy, admin_proxy = deferred
    async with LensClient(target) as client:
        for call in (client.create_session(), client.lens_status(), _first(client)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in (caught.value.details() or "")

        fake = FakeServeServicer()
        serve_proxy.bind(fake)
        admin_proxy.bind(FakeAdminServicer())
        assert (await client.get_session("x")).lifetime_tokens == 7
        assert [c.text for c in [c async for c in client.generate("hi")]][:2] == ["t0", "t1"]
        assert (await client.append("s", text="abcd", chunk_chars=2)).appended_tokens == 4
        assert (await client.set_lens_version("v2")).current_version == "v2"
        # Errors from the bound servicer still go through the one mapping.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.get_session("missing")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def _first(client: LensClient) -> pb.GenerateResponse:
    return await anext(client.generate("hi"))


# ---- command line -------------------------------------------------------------------------------


def test_serve_help_lists_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--model",
        "--host",
        "--port",
        "--redis-url",
        "--metrics-port",
        "--shadow-rate",
        "--tail",
        "--enforce-eager",
        "--no-enforce-eager",
        "--models-dir",
    ):
        assert flag in out
    assert "LENS_SHADOW_RATE" in out


@pytest.fixture
def captured_settings(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """Replaces server.serve: records the Settings the CLI built instead of serving."""
    seen: list[Settings] = []

    async def fake_serve(settings: Settings) -> None:
        seen.append(settings)

    monkeypatch.setattr(server, "serve", fake_serve)
    return seen


def test_serve_invalid_setting_exits_2_naming_field(
    captured_settings: list[Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--tail", "5000"]) == 2
    err = capsys.readouterr().err
    assert "tail" in err
    assert captured_settings == []


def test_serve_invalid_env_value_exits_2_naming_field(
    captured_settings: list[Settings],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LENS_SHADOW_RATE", "2.5")
    assert cli.main(["serve"]) == 2
    assert "--shadow-rate / LENS_SHADOW_RATE" in capsys.readouterr().err


def test_serve_flags_override_env_and_env_fills_the_rest(
    captured_settings: list[Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LENS_PORT", "6000")
    monkeypatch.setenv("LENS_HOST", "0.0.0.0")
    argv = ["serve", "--port", "0", "--shadow-rate", "0.25", "--enforce-eager", "--model", "tiny"]
    assert cli.main(argv) == 0
    (settings,) = captured_settings
    assert settings.port == 0  # flag beats LENS_PORT
    assert settings.host == "0.0.0.0"  # from the environment
    assert settings.shadow_rate == 0.25
    assert settings.enforce_eager is True
    assert settings.model == "tiny"
    assert settings.tail == Settings.model_fields["tail"].default  # untouched field keeps default


def test_engine_config_follows_the_settings(tmp_path: Path) -> None:
    import torch

    auto = Settings.model_validate({"redis_url": "redis://unused"}).engine_config(tmp_path)
    assert auto.model == str(tmp_path)
    assert auto.kv_block_size == (None if torch.cuda.is_available() else 32)
    assert auto.dtype == ("bfloat16" if torch.cuda.is_available() else "float32")
    assert (auto.max_num_batched_tokens, auto.long_prefill_tokens) == (None, None)
    chosen = Settings.model_validate(
        {"redis_url": "redis://unused", "kv_block_size": 128, "dtype": "bfloat16",
         "step_rows": 256, "shared_step_rows": 32}
    )  # fmt: skip
    config = chosen.engine_config(tmp_path)
    assert (config.kv_block_size, config.dtype) == (128, "bfloat16")
    assert (config.max_num_batched_tokens, config.long_prefill_tokens) == (256, 32)


def test_serve_log_json_flag_configures_json_logs(
    captured_settings: list[Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--log-json", "serve"]) == 0
    logging.getLogger("lens_serve.test").warning("hello %s", "json")
    assert '"message": "hello json"' in capsys.readouterr().err


def test_configure_logging_sends_vllm_logs_to_stderr(
    captured_settings: list[Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    # stdout is reserved for the `listening on` line.
    monkeypatch.delenv("VLLM_LOGGING_STREAM", raising=False)
    configure_logging("INFO")
    assert os.environ["VLLM_LOGGING_STREAM"] == "ext://sys.stderr"
    monkeypatch.setenv("VLLM_LOGGING_STREAM", "ext://sys.stdout")
    configure_logging("INFO")
    assert os.environ["VLLM_LOGGING_STREAM"] == "ext://sys.stdout"  # the operator's choice wins


def test_configure_logging_unknown_level_raises() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("LOUD")


async def test_until_stopped_cancels_load_when_stop_set_first() -> None:
    stop = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow_load() -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "loaded"

    asyncio.get_running_loop().call_later(0.05, stop.set)
    assert await server._until_stopped(slow_load(), stop) is None
    assert cancelled.is_set()


async def test_until_stopped_returns_result_and_raises_errors() -> None:
    async def quick() -> str:
        return "loaded"

    async def broken() -> str:
        raise FileNotFoundError("no model")

    assert await server._until_stopped(quick(), asyncio.Event()) == "loaded"
    with pytest.raises(FileNotFoundError, match="no model"):
        await server._until_stopped(broken(), asyncio.Event())


# ---- serve(): the production lifecycle, with the engine and service replaced by fakes ----------


class FakeEngine:
    def __init__(self) -> None:
        self.shut_down = False

    async def is_healthy(self) -> bool:
        return True

    async def shutdown(self) -> None:
        self.shut_down = True


async def _wait_for(predicate: Callable[[], object], what: str) -> object:
    """Polls (log records and captured output have no event to wait on) for up to 10 s."""
    for _ in range(500):
        if value := predicate():
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_serve_lifecycle_loading_serving_drain(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # the embedded Redis keeps its data under ./.cache/redis
    release = asyncio.Event()
    engine = FakeEngine()
    fake_servicer = FakeServeServicer()

    async def fake_load(
        settings: Settings, redis: Any, domain: contextlib.AsyncExitStack
    ) -> tuple[Any, Any, Any, Callable[[], float]]:
        assert await redis.ping()  # the embedded redis-server is up before loading
        domain.push_async_callback(server._step, "engine shut down", engine.shutdown)
        await release.wait()
        return fake_servicer, FakeAdminServicer(), engine, lambda: 0.0  # LensNet watcher never down

    monkeypatch.setattr(server, "_load", fake_load)
    settings = make_settings(host="127.0.0.1", port=0, drain_seconds=0.5)
    caplog.set_level(logging.INFO)
    task = asyncio.create_task(server.serve(settings))

    def bound_port() -> int | None:
        for record in caplog.records:
            message = record.getMessage()
            if message.startswith("gRPC server bound to"):
                return int(message.split()[4].rsplit(":", 1)[1])
        return None

    port = cast(int, await _wait_for(bound_port, "the server to bind"))
    target = f"127.0.0.1:{port}"
    async with grpc.aio.insecure_channel(target) as channel, LensClient(target) as client:
        health_stub: Any = health_pb2_grpc.HealthStub(channel)  # stubs declare no methods
        check = health_pb2.HealthCheckRequest(service="lens_serve.v1.LensServe")
        # Loading: the server answers, health says NOT_SERVING, RPCs say UNAVAILABLE.
        assert (await health_stub.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.create_session()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "listening on" not in capsys.readouterr().out

        release.set()
        out = cast(str, await _wait_for(lambda: capsys.readouterr().out, "the listening line"))
        assert out == f"listening on 127.0.0.1:{port}\n"
        assert (await health_stub.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
        assert (await client.get_session("x")).lifetime_tokens == 7

        # A stream in flight when SIGTERM arrives is cancelled after drain_seconds.
        stream = client.generate("slow")
        assert (await anext(stream)).text == "t0"
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, timeout=15)
        assert fake_servicer.observed.cancelled.is_set()
        await stream.aclose()

    assert engine.shut_down
    steps = [r.getMessage() for r in caplog.records if r.name == "lens_serve.service.server"]
    order = [
        "received SIGTERM: shutting down",
        "health set to NOT_SERVING",
        "gRPC server stopped (drain up to 0.5 s)",
        "engine shut down",
        "redis client closed",
        "lens-serve stopped",
    ]
    assert [s for s in steps if s in order] == order
    assert any("embedded redis-server stopped" in r.getMessage() for r in caplog.records)
    assert (tmp_path / ".cache" / "redis" / "redis.log").exists()
