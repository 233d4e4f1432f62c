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

KEY, VALUE = "Kolvera", "48213"
FACT = f"The special magic number for {KEY} is {VALUE}."
PROMPT = (
    f"\n\nQuestion: What is the special magic number for {KEY}?\n"
    f"Answer: The special magic number for {KEY} is"
)
POLICIES = ("lens", "recency")
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
        kind = ("recalled" if s.recalled else "raw     ") if s.lod == 0 else f"LOD{s.lod}    "
        lines.append(f"    {kind} tokens [{s.start:>5}, {s.end:>5})  {s.rows:>4} rows")
    if frame := wc.rows - sum(s.rows for s in wc.spans):
        lines.append(f"    the gists' frame            {frame:>4} rows")
    return "\n".join(lines)


def long_text(chars: int, depth: float) -> str:
    """Held-out essays up to `chars` characters, with FACT after the paragraph at `depth`."""
    text = "\n\n".join(corpus.split(corpus.essays(), held_out=True).values())[:chars]
    cut = text.index("\n\n", int(depth * len(text)))
    return f"{text[:cut]}\n\n{FACT}{text[cut:]}"


def run(config: ServerDemoConfig, out: TextIO = sys.stdout) -> None:
    text = long_text(config.chars, config.depth)
    with tempfile.TemporaryDirectory(prefix="lens-demo-") as tmp:
        server, target = _start_server(config.model, Path(tmp))
        try:
            with SyncLensClient(target) as client:
                out.write(
                    f"server on {target}; model {config.model}\n"
                    f"fact at {config.depth:.0%} of {len(text)} characters of held-out essays: "
                    f"{FACT!r}\nprompt: {PROMPT!r}\n"
                )
                for policy in POLICIES:
                    _ask(client, text, policy, config, out)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)


def _ask(
    client: SyncLensClient, text: str, policy: str, config: ServerDemoConfig, out: TextIO
) -> None:
    """A fresh session of `text`, the spans `policy` shows for the prompt, then its answer."""
    session = client.create_session().session_id
    try:
        client.append(session, text=text)
        wc = client.working_context(session, wc_budget=config.budget, policy=policy, query=PROMPT)
        out.write(
            f"\n[{policy}] working context for the prompt ({wc.rows} rows):\n{span_map(wc)}\n"
        )
        usage = pb.Usage()
        answer = ""
        for chunk in client.generate(
            PROMPT, session_id=session, max_tokens=config.max_tokens, temperature=0.0,
            wc_budget=config.budget, policy=policy,
        ):  # fmt: skip
            answer += chunk.text
            if chunk.HasField("usage"):
                usage = chunk.usage
        verdict = "right" if VALUE in answer else "wrong"
        out.write(
            f"[{policy}] answer: {answer.strip()!r} ({verdict}); lifetime {usage.lifetime_tokens} "
            f"tokens, WC {usage.wc_rows} rows, {usage.gist_covered_tokens} tokens as gists, "
            f"chosen for the {usage.query_source} ({usage.query_tokens} tokens) in "
            f"{usage.wc_choice_ms:.1f} ms\n"
        )
    finally:
        client.delete_session(session)
