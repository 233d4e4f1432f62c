"""Shadow jobs: what a sampled request leaves for the shadow scorer, built cheaply on the request
path (the measuring happens in the background)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lens_serve import tracing
from lens_serve.core.context import Tiling, WorkingContext
from lens_serve.core.policies import ContextChooser
from lens_serve.core.tree import LifetimeTree

MAX_TARGET_TOKENS = 256
"""A completion target is its first tokens at most: the record (which keeps each variant's
per-token NLLs) stays bounded however long the answer."""


@dataclass(frozen=True)
class ShadowJob:
    request_id: str
    session_id: str
    policy: str
    lifetime_tokens: np.ndarray  # (n,) copy of the lifetime the WC was chosen over
    served: WorkingContext | None  # None: choose it here, with `policy`, over the lifetime
    served_tiling: Tiling | None  # the lens policy's tiling (random variants edit it)
    target_ids: list[int]
    budget: int
    tail: int
    chooser: ContextChooser
    query: np.ndarray | None = None  # (Q,) what the served WC was chosen for; None: newest tokens
    trace: tracing.Parent | None = None  # the request's span: the shadow span's parent


def build_job(
    *,
    request_id: str,
    session_id: str,
    policy: str,
    tree: LifetimeTree,
    served: WorkingContext,
    served_tiling: Tiling | None,
    prompt: Sequence[int],
    completion: Sequence[int],
    budget: int,
    tail: int,
    chooser: ContextChooser,
    target: Literal["completion", "prompt"],
    target_tokens: int,
    query: Sequence[int] | None = None,
) -> ShadowJob | None:
    """The job for one served request, or None when it has nothing to measure.

    `target` "completion" scores the completion after the served WC; "prompt" holds out the
    prompt's last `target_tokens` tokens, and the worker chooses the WC over what precedes them."""
    lifetime = tree.tokens(0, served.lifetime).copy()
    wc: WorkingContext | None = served
    target_ids = list(completion[:MAX_TARGET_TOKENS])
    if target == "prompt":
        held_out = min(target_tokens, len(prompt) - 1)
        if held_out < 1:
            return None
        lifetime, target_ids = lifetime[:-held_out], lifetime[-held_out:].tolist()
        if query is not None and list(query[-held_out:]) == target_ids:
            query = query[:-held_out]  # the prompt was the query: it must not hold the answer
        wc, served_tiling = None, None  # re-chosen over the shorter lifetime in the worker
    if not target_ids:
        return None
    return ShadowJob(
        request_id=request_id,
        session_id=session_id,
        policy=policy,
        lifetime_tokens=lifetime,
        served=wc,
        served_tiling=served_tiling,
        target_ids=target_ids,
        budget=budget,
        tail=tail,
        chooser=chooser,
        query=None if query is None else np.asarray(query, dtype=np.int64),
        trace=tracing.current(),
    )
