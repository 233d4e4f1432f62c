"""The demos' settings and descriptions, apart from the demos themselves so that the command line
can list them without importing torch (`lens-serve --help` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass

DEMO_DOC = """The core on the real model, end to end, without a server: ingest a long held-out
text, choose a working context under every policy, and print each span map and the NLL of what
comes next.

    lens-serve demo [--model smollm2-135m] [--lifetime 6144] [--budget 1024] [--tail 128]"""

SERVER_DEMO_DOC = """The real thing, end to end: start `lens-serve serve` on SmolLM2-135M with its
embedded Redis, put a fact deep into a long session of held-out essays, ask about it under `lens`
and under `recency`, and print each answer and the working-context map (which spans the model saw
raw, which as gists).

    lens-serve demo-server [--model smollm2-135m] [--budget 1024] [--chars 64000] [--depth 0.3]"""


@dataclass(frozen=True)
class DemoConfig:
    model: str = "smollm2-135m"
    lifetime: int = 6144
    budget: int = 1024
    tail: int = 128
    continuation: int = 64
    seed: int = 0


@dataclass(frozen=True)
class ServerDemoConfig:
    model: str = "smollm2-135m"
    budget: int = 1024
    max_tokens: int = 12
    chars: int = 64_000
    """Characters of held-out essays in the session (about 4 per token)."""
    depth: float = 0.3
    """Where the fact sits, as a share of the text."""
