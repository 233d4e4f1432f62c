"""`lens-serve serve` as a real process, for the integration tests that need one of their own
(the test session's in-process stack keeps its one vLLM engine)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

START_TIMEOUT_S = 240.0  # a cold vLLM start with torch.compile takes 70-90 s on 2 cores
SMALL_ENGINE_ENV = {
    # Small enough for a CI machine (the defaults size a real deployment).
    "LENS_MAX_MODEL_LEN": "2048",
    "LENS_MAX_WC_BUDGET": "1024",
    "LENS_WC_BUDGET": "256",
    "LENS_TAIL": "32",
    "LENS_KV_CACHE_GIB": "0.5",
    "LENS_ENFORCE_EAGER": "true",
}


def start_server(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    """`lens-serve serve ARGS` (the installed console script) with `env` over this process's
    environment and SMALL_ENGINE_ENV; its stderr goes to `log`, its stdout is piped."""
    command = Path(sys.executable).with_name("lens-serve")
    assert command.exists(), f"{command} missing: pip install -e ."
    with log.open("w") as stderr:
        return subprocess.Popen(
            [str(command), "serve", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, **SMALL_ENGINE_ENV, **env},
        )


def wait_listening(proc: subprocess.Popen[str], log: Path) -> str:
    """The address of the server's `listening on HOST:PORT` line; fails the test with the log's
    tail if the server exits or is not listening within START_TIMEOUT_S."""
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"lens-serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready and (line := proc.stdout.readline()).startswith("listening on "):
            return line.removeprefix("listening on ").strip()
    pytest.fail(f"lens-serve not listening after {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
