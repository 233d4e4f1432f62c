"""`lens-serve demo-server`: a real server, a long essay, a question and the WC map
(`demo_configs.SERVER_DEMO_DOC`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from lens_serve.assets import corpus
from lens_serve.assets.model_dirs import models_dir
from lens_serve.client import SyncLensClient
from lens_serve.tools.demo_configs import ServerDemoConfig
from lens_serve.v1 import lens_serve_pb2 as pb

QUESTION = "In one sentence, what is the essay above about?"
START_TIMEOUT_S = 300  # a cold vLLM start compiles; seen 30-90 s on 2 CPU cores


def _start_server(model: str, data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    env = {
        **os.environ,
        "LENS_MODEL": model,
        "LENS_PORT": "0",
        "LENS_MODELS_DIR": str(models_dir()),
    }
    # Each demo gets a private Redis data dir, so earlier runs leave nothing behind.
    cmd = [sys.executable, "-m", "lens_serve", "--log-level", "WARNING", "serve"]
    server = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=data_dir, stderr=sys.stderr
    )
    assert server.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if line.startswith("listening on "):
            return server, line.split()[-1]
        if not line and server.poll() is not None:
            raise RuntimeError(f"lens-serve exited with {server.returncode} before listening")
    server.kill()
    raise RuntimeError(f"lens-serve did not listen within {START_TIMEOUT_S} s")


def span_map(wc: pb.WorkingContext) -> str:
    lines = []
    for s in wc.spans:
        kind = "raw " if s.lod == 0 else f"LOD{s.lod}"
        lines.append(f"    {kind} tokens [{s.start:>5}, {s.end:>5})  {s.rows:>4} rows")
    if frame := wc.rows - sum(s.rows for s in wc.spans):
        lines.append(f"    the gists' frame            {frame:>4} rows")
    return "\n".join(lines)


def run(config: ServerDemoConfig, out: TextIO = sys.stdout) -> None:
    essay_name, essay = sorted(corpus.split(corpus.essays(), held_out=True).items())[0]
    with tempfile.TemporaryDirectory(prefix="lens-demo-") as tmp:
        server, target = _start_server(config.model, Path(tmp))
        try:
            with SyncLensClient(target) as client:
                out.write(f"server on {target}; model {config.model}\n")
                session = client.create_session()
                appended = client.append(session.session_id, text=essay)
                out.write(
                    f"appended essay '{essay_name}': {appended.lifetime_tokens} tokens "
                    f"into session {session.session_id}\n\nQ: {QUESTION}\nA: "
                )
                usage = pb.Usage()
                for chunk in client.generate(
                    QUESTION, session_id=session.session_id, chat=True,
                    max_tokens=config.max_tokens, wc_budget=config.budget,
                ):  # fmt: skip
                    out.write(chunk.text)
                    out.flush()
                    if chunk.HasField("usage"):
                        usage = chunk.usage
                out.write(
                    f"\n\nusage: lifetime {usage.lifetime_tokens} tokens, WC {usage.wc_rows} rows "
                    f"(budget {config.budget}), {usage.gist_covered_tokens} tokens as gists, "
                    f"LensNet {usage.lens_version}, WC chosen in {usage.wc_choice_ms:.1f} ms, "
                    f"{usage.cached_rows} rows from the prefix cache\n"
                )
                wc = client.working_context(session.session_id, wc_budget=config.budget)
                out.write(f"working context now ({wc.rows} rows):\n{span_map(wc)}\n")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
