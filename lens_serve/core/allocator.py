"""The focus allocator: turn LensNet's unit scores into legal expand/collapse edits of a tiling.

Greedy and cache-aware. vLLM's prefix cache keeps every row before the first edited one, so an edit
at row p costs the recomputation of all rows after p: each candidate's key is its score minus
`cache_weight` times that fraction (for a fresh working context nothing is cached and the weight is
zero). Per step:

1. Budget: when the tiling has more rows than the budget (new tokens arrived), collapse the
   candidates with the lowest key (low-scoring spans near the tail go first) until it is
   `refit_headroom` of the budget below it. A session's next turns then only append rows, which
   keeps the whole cached prefix; without headroom every turn would edit just before the tail and
   recompute everything from there.
2. Improve: take expand candidates (score > expand_threshold) in descending key; an expand that
   fits the free rows is applied (on a continuing session the headroom is not free: it is kept for
   the next turns' tokens); otherwise it is paid for by collapses in ascending key, but only
   those whose key is below the expand's by `expand_threshold + collapse_threshold` (the deadband
   that keeps the choice from flapping). At most `max_edits` edits per step.
3. Hysteresis: a unit created by an edit cannot be undone for `cooldown_steps` steps.

Every edit is legal by construction: only real tree nodes, whole aligned sibling groups, nothing in
the raw tail. Candidates are scored once per step, so a step is O(U log U)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lens_serve.core.context import Tiling, Unit, children, expansion_cost
from lens_serve.errors import InvalidRequest


@dataclass(frozen=True)
class FocusConfig:
    expand_threshold: float = 0.1
    """Minimum score for an expand."""
    collapse_threshold: float = 0.1
    """Added to expand_threshold: the score margin a collapse must lose by to fund an expand."""
    max_edits: int = 8
    """Edits per step on a session's existing working context (bounds cache invalidation)."""
    fresh_max_edits: int = 64
    """Edits per step when a working context is built from scratch (nothing cached to lose)."""
    fresh_rounds: int = 3
    """Scoring rounds of a fresh working context, each refining spans one level further (LOD 3
    to raw tokens in three). A round is one more LensNet pass: about 4 ms at W = 2048 on 2 CPU
    cores."""
    cooldown_steps: int = 2
    """Steps during which a unit created by an edit cannot be undone."""
    cache_weight: float = 0.5
    """Score units charged per fraction of the working context's rows an edit recomputes."""
    refit_headroom: float = 0.25
    """Share of the budget a continuing session's refit leaves free for the next turns' tokens."""
    prior_floor: float = 1.0
    """Least `lens` score of a unit the retrieval prior picked (a BM25 block or a neighbour; the
    prior scores them 1): LensNet's residual may raise any unit but not lower those, so one is
    collapsed only to pay for an expand scoring above prior_floor + expand_threshold +
    collapse_threshold. A residual trained on a few dozen records collapsed the neighbour that
    held the second half of a fact straddling two blocks: the retrieved blocks stay until records
    can tell such neighbours apart. -inf: no floor."""
    residual_deadband: float = 0.5
    """LensNet's residual counts only past this magnitude (soft threshold). The residual drifts on
    units no record measured (the gate bounds the mean, `drift`); acting on that noise refines
    gists all over the lifetime and pays with the recent raw blocks."""


def lens_scores(prior: np.ndarray, residual: np.ndarray, config: FocusConfig) -> np.ndarray:
    """(U,) the `lens` score of each unit: the prior (U,) plus LensNet's residual (U,) shrunk by
    `config.residual_deadband`, floored at `config.prior_floor` where the prior picked the unit."""
    band = config.residual_deadband
    scores = prior + np.sign(residual) * np.maximum(np.abs(residual) - band, 0.0)
    return np.where(prior > 0, np.maximum(scores, config.prior_floor), scores)


@dataclass
class FocusState:
    """Per-session allocator memory: the last tiling and when each edited unit was made."""

    tiling: Tiling
    step: int = 0
    created_at: dict[Unit, int] = field(default_factory=dict)


@dataclass(frozen=True)
class EditStats:
    expands: int
    collapses: int
    forced_collapses: int


@dataclass(frozen=True)
class _Collapse:
    position: int  # index of the first unit of the group
    length: int  # units in the group
    parent: Unit
    refund: int  # rows freed
    key: float


def collapse_candidates(
    tiling: Tiling, scores: np.ndarray, node_counts: list[int], tail: int, penalty: np.ndarray
) -> list[_Collapse]:
    b, r, n = tiling.block_size, tiling.gist_rows, tiling.lifetime
    units = tiling.units
    out = []
    for p, (lod, index) in enumerate(units):
        if lod < 0:
            continue  # a recalled block: a policy adds and drops these, the allocator does not
        if lod == 0:
            if (index + 1) * b > n - tail:
                continue  # touches the raw tail
            out.append(_Collapse(p, 1, (1, index), b - r, float(scores[p] + penalty[p])))
        elif index % b == 0 and p + b <= len(units) and index // b < _count(node_counts, lod + 1):
            group = units[p : p + b]
            if group[-1] == (lod, index + b - 1) and all(u[0] == lod for u in group):
                # Sibling indices are consecutive, so first, last and LOD suffice.
                key = float(scores[p : p + b].mean() + penalty[p])
                out.append(_Collapse(p, b, (lod + 1, index // b), b * r - r, key))
    out.sort(key=lambda c: (c.key, -c.position))  # ties: the newest first
    return out


def _count(node_counts: list[int], level: int) -> int:
    return node_counts[level] if level < len(node_counts) else 0


def refocus(
    state: FocusState,
    scores: np.ndarray,
    budget: int,
    tail: int,
    node_counts: list[int],
    config: FocusConfig,
    fresh: bool,
) -> tuple[FocusState, EditStats]:
    """One allocator step on `state.tiling` with per-unit `scores` (U,). Returns the new state."""
    tiling = state.tiling
    step = state.step + 1
    cooled = {u for u, made in state.created_at.items() if step - made < config.cooldown_steps}
    scores = np.asarray(scores[: len(tiling.units)], dtype=np.float64)
    # A fresh WC has nothing cached to keep, so it may use every row of the budget.
    target = budget if fresh else budget - int(config.refit_headroom * budget)
    forced = 0
    while tiling.rows > budget:
        tiling, scores, applied = _force_fit(
            tiling, scores, target, tail, node_counts, config, fresh
        )
        if not applied:
            raise InvalidRequest(
                "wc_budget", f"{budget} rows cannot hold this lifetime's coarsest tiling"
            )
        forced += applied
    tiling, scores, expands, collapses, created = _improve(
        tiling, scores, target, tail, node_counts, config, fresh, cooled
    )
    made = {u: s for u, s in state.created_at.items() if step - s < config.cooldown_steps}
    made.update(dict.fromkeys(created, step))
    tiling.scores = scores.astype(np.float32).tolist()
    return FocusState(tiling, step, made), EditStats(expands, collapses, forced)


def _cache_penalty(tiling: Tiling, config: FocusConfig, fresh: bool) -> np.ndarray:
    """(U,) cost of editing each unit: the share of rows from it onwards that must be recomputed."""
    rows = np.array([tiling.unit_rows(u) for u in tiling.units], dtype=np.float64)
    total = max(tiling.rows, 1)
    weight = 0.0 if fresh else config.cache_weight
    return weight * (total - (np.cumsum(rows) - rows)) / total


def _force_fit(
    tiling: Tiling,
    scores: np.ndarray,
    target: int,
    tail: int,
    node_counts: list[int],
    config: FocusConfig,
    fresh: bool,
) -> tuple[Tiling, np.ndarray, int]:
    excess = tiling.rows - target
    penalty = _cache_penalty(tiling, config, fresh)
    chosen: list[_Collapse] = []
    taken: set[int] = set()
    for c in collapse_candidates(tiling, scores, node_counts, tail, penalty):
        if excess <= 0:
            break
        if taken.isdisjoint(range(c.position, c.position + c.length)):
            chosen.append(c)
            taken.update(range(c.position, c.position + c.length))
            excess -= c.refund
    new_tiling, new_scores, _ = _apply(tiling, scores, chosen, [])
    return new_tiling, new_scores, len(chosen)


def _improve(
    tiling: Tiling,
    scores: np.ndarray,
    limit: int,
    tail: int,
    node_counts: list[int],
    config: FocusConfig,
    fresh: bool,
    cooled: set[Unit],
) -> tuple[Tiling, np.ndarray, int, int, list[Unit]]:
    b, r = tiling.block_size, tiling.gist_rows
    cap = config.fresh_max_edits if fresh else config.max_edits
    penalty = _cache_penalty(tiling, config, fresh)
    expand_keys = scores - penalty
    expands = [
        p
        for p, u in enumerate(tiling.units)
        if u[0] >= 1 and scores[p] > config.expand_threshold and u not in cooled
    ]
    expands.sort(key=lambda p: (-expand_keys[p], -p))
    collapses = [
        c
        for c in collapse_candidates(tiling, scores, node_counts, tail, penalty)
        if not any(u in cooled for u in tiling.units[c.position : c.position + c.length])
    ]
    margin = config.expand_threshold + config.collapse_threshold
    slack = max(limit - tiling.rows, 0)  # rows past `limit` are a continuing session's headroom
    taken: set[int] = set()
    chosen_expands: list[int] = []
    chosen_collapses: list[_Collapse] = []
    for p in expands:
        if len(chosen_expands) + len(chosen_collapses) >= cap:
            break
        if p in taken:
            continue
        cost = expansion_cost(tiling.units[p], b, r)
        funding: list[_Collapse] = []
        freed = slack
        for c in collapses:
            if freed >= cost:
                break
            span = range(c.position, c.position + c.length)
            if c.key < expand_keys[p] - margin and p not in span and taken.isdisjoint(span):
                funding.append(c)
                freed += c.refund
        if freed < cost or len(chosen_expands) + len(chosen_collapses) + 1 + len(funding) > cap:
            break  # later expands score lower: funding them can only get harder
        for c in funding:
            taken.update(range(c.position, c.position + c.length))
            collapses.remove(c)
        taken.add(p)
        chosen_expands.append(p)
        chosen_collapses.extend(funding)
        slack = freed - cost
    new_tiling, new_scores, created = _apply(tiling, scores, chosen_collapses, chosen_expands)
    return new_tiling, new_scores, len(chosen_expands), len(chosen_collapses), created


def _apply(
    tiling: Tiling, scores: np.ndarray, collapses: list[_Collapse], expands: list[int]
) -> tuple[Tiling, np.ndarray, list[Unit]]:
    """Rebuild the unit list in one pass. New units inherit their origin's score."""
    by_position = {c.position: c for c in collapses}
    expand_set = set(expands)
    units: list[Unit] = []
    new_scores: list[float] = []
    created: list[Unit] = []
    p = 0
    while p < len(tiling.units):
        unit = tiling.units[p]
        if p in by_position:
            c = by_position[p]
            units.append(c.parent)
            new_scores.append(float(scores[p : p + c.length].mean()))
            created.append(c.parent)
            p += c.length
            continue
        if p in expand_set:
            kids = children(unit, tiling.block_size)
            units.extend(kids)
            new_scores.extend([float(scores[p])] * len(kids))
            created.extend(kids)
        else:
            units.append(unit)
            new_scores.append(float(scores[p]))
        p += 1
    new = tiling.with_units(units)
    return new, np.asarray(new_scores, dtype=np.float64), created
