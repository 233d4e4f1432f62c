"""`lens-serve serve` as a real process: SIGKILLed, it leaves no process behind (the vLLM engine
core and the multiprocessing resource tracker are its children)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.integration.server_process import START_TIMEOUT_S, start_server, wait_listening

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXIT_TIMEOUT_S = 5.0


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from the state on (index 0 = state), or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces


def _descendants(root: int) -> set[tuple[int, str]]:
    """(pid, start time) of every live descendant of `root`: the start time tells a process apart
    from a later one that reuses its pid."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if (fields := _stat(child)) is not None:
                found.add((child, fields[19]))
                todo.append(child)
    return found


def _alive(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Those still running: not gone, not a zombie (dead, waiting for init to reap it), not a
    newer process with a reused pid."""
    alive = set()
    for pid, started in processes:
        fields = _stat(pid)
        if fields is not None and fields[0] not in ("Z", "X") and fields[19] == started:
            alive.add((pid, started))
    return alive


@pytest.mark.timeout(START_TIMEOUT_S + 60)
def test_sigkilled_server_leaves_no_process_behind(
    tiny_model_dir: Path, redis_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    args = ["--model", "tiny", "--port", "0", "--redis-url", redis_url]
    server = start_server(args, {"LENS_MODELS_DIR": str(tiny_model_dir.parent)}, log)
    children: set[tuple[int, str]] = set()
    try:
        wait_listening(server, log)
        children = _descendants(server.pid)
        assert children, "the server runs vLLM's engine core in a child process"
        server.send_signal(signal.SIGKILL)
        server.wait(EXIT_TIMEOUT_S)
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while _alive(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid, _ in _alive(children)}
        assert not left, f"orphans of the killed server: {left}"
    finally:
        server.kill()
        server.wait()
        for pid, _ in _alive(children):  # orphans of a failed run
            os.kill(pid, signal.SIGKILL)
