"""Policies: how a working context is chosen for a request.

- `lens`: LensNet scores + the focus allocator, continuing the session's previous choice when there
  is one (so its prefix stays cached), else starting from the newest-first tiling.
- `recency`: the newest `budget` tokens, raw; older text is dropped.
- `uniform`: all older text at one level, the finest at which the whole lifetime fits.
- `random`: the coarsest tiling with random expansions (explicit seed) until no more fit.
- `full`: every token raw; only when the lifetime fits the budget.
Every policy's result holds the docs/design.md §2 invariants (tests check this for random
inputs)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from lens_serve.core.allocator import EditStats, FocusConfig, FocusState, refocus
from lens_serve.core.context import (
    Tiling,
    Unit,
    WorkingContext,
    children,
    coarsest_tiling,
    expansion_cost,
    extend_tiling,
    fill_newest_first,
    levels_for,
    tiling_at_level,
    validate_budget,
)
from lens_serve.core.lensnet import LensNet, score_units, unit_inputs
from lens_serve.core.tree import LifetimeTree
from lens_serve.errors import InvalidRequest

POLICIES = ("lens", "recency", "uniform", "random", "full")


@dataclass(frozen=True)
class Choice:
    working_context: WorkingContext
    focus: FocusState | None  # the lens policy's state to keep for the session's next request
    stats: EditStats | None
    choice_ms: float


class ContextChooser:
    """Chooses working contexts with one LensNet (swap the chooser to swap LensNet versions)."""

    def __init__(self, lensnet: LensNet, focus: FocusConfig | None = None) -> None:
        self.lensnet = lensnet
        self.lens_version = lensnet.version  # hashed once: the weights never change in place
        self.focus = focus or FocusConfig()

    def choose(
        self,
        tree: LifetimeTree,
        policy: str,
        budget: int,
        tail: int,
        *,
        seed: int = 0,
        state: FocusState | None = None,
    ) -> Choice:
        began = time.perf_counter()
        n = tree.lifetime
        b, r, f = tree.block_size, tree.gist_rows, tree.frame_rows
        check_feasible(policy, n, budget, tail, b, r, f)
        focus: FocusState | None = None
        stats: EditStats | None = None
        if policy == "recency":
            wc = recency(n, budget, b, r)
        elif policy == "full":
            wc = recency(n, budget, b, r, policy="full")
        else:
            coarse = coarsest_tiling(n, tail, tree.levels, b, r, f)
            if policy == "uniform":
                wc = uniform(coarse, budget, tail, tree.levels).to_working_context("uniform")
            elif policy == "random":
                rng = np.random.default_rng(seed)
                wc = random_fill(coarse, budget, rng).to_working_context("random")
            else:
                focus, stats = self._lens(tree, coarse, budget, tail, state)
                wc = focus.tiling.to_working_context("lens", self.lens_version)
        return Choice(wc, focus, stats, (time.perf_counter() - began) * 1e3)

    def _lens(
        self, tree: LifetimeTree, coarse: Tiling, budget: int, tail: int, state: FocusState | None
    ) -> tuple[FocusState, EditStats]:
        fresh = not _continues(state, tree, budget, tail)
        if fresh or state is None:
            state = FocusState(fill_newest_first(coarse, budget))
        else:
            state = FocusState(
                extend_tiling(state.tiling, tree.lifetime), state.step, state.created_at
            )
        node_counts = [tree.node_count(k) for k in range(tree.levels + 1)]
        if not fresh:
            scores = score_units(self.lensnet, unit_inputs(tree, state.tiling, tail))
            return refocus(state, scores, budget, tail, node_counts, self.focus, fresh)
        # A fresh WC is refined coarse to fine: each round scores the units the previous one
        # revealed, so a span deep in the oldest gist can reach raw tokens in one request. The
        # cooldown guards a session's turns against flapping; within one choice, refining a unit
        # just made is the point, so every round starts without it and the units made by all
        # rounds are protected from the next turn on.
        made: set[Unit] = set()
        totals = np.zeros(3, dtype=np.int64)  # expands, collapses, forced collapses
        for _ in range(self.focus.fresh_rounds):
            scores = score_units(self.lensnet, unit_inputs(tree, state.tiling, tail))
            state, stats = refocus(
                FocusState(state.tiling, state.step),
                scores,
                budget,
                tail,
                node_counts,
                self.focus,
                fresh,
            )
            made.update(state.created_at)
            totals += (stats.expands, stats.collapses, stats.forced_collapses)
            if stats.expands + stats.collapses + stats.forced_collapses == 0:
                break
        state = FocusState(state.tiling, state.step, dict.fromkeys(made, state.step))
        return state, EditStats(*(int(t) for t in totals))


def check_feasible(
    policy: str,
    lifetime: int,
    budget: int,
    tail: int,
    block_size: int,
    gist_rows: int,
    frame_rows: int = 0,
) -> None:
    """Raise InvalidRequest (naming the field) unless `policy` can choose a WC of `budget` rows for
    `lifetime` tokens. Pure arithmetic, so callers can check before writing anything."""
    validate_budget(budget, tail)
    if policy not in POLICIES:
        raise InvalidRequest("policy", f"must be one of {POLICIES}, got {policy!r}")
    if policy == "full" and lifetime > budget:
        raise InvalidRequest(
            "wc_budget", f"policy full needs all {lifetime} lifetime tokens raw, budget is {budget}"
        )
    if policy in ("lens", "uniform", "random"):
        levels = levels_for(lifetime, block_size)
        needed = coarsest_tiling(lifetime, tail, levels, block_size, gist_rows, frame_rows).rows
        if needed > budget:
            raise InvalidRequest(
                "wc_budget",
                f"{budget} rows cannot cover {lifetime} tokens with a raw tail of {tail}; "
                f"at least {needed} are needed",
            )


def _continues(state: FocusState | None, tree: LifetimeTree, budget: int, tail: int) -> bool:
    """Can the session's previous tiling be continued (and its cached prefix kept)?"""
    if state is None or state.tiling.lifetime > tree.lifetime:
        return False
    old = state.tiling
    if (old.block_size, old.gist_rows) != (tree.block_size, tree.gist_rows):
        return False
    grown = tree.lifetime - old.lifetime
    if grown > budget // 2:
        return False  # so much is new that the old prefix is a small share: start afresh
    first_tail_token = tree.lifetime - tail
    return all(lod == 0 or old.unit_span((lod, i))[1] <= first_tail_token for lod, i in old.units)


def recency(
    n: int, budget: int, block_size: int, gist_rows: int, policy: str = "recency"
) -> WorkingContext:
    keep = min(n, budget)
    return WorkingContext(
        lods=np.zeros(keep, dtype=np.int8),
        starts=np.arange(n - keep, n, dtype=np.int64),
        lifetime=n,
        block_size=block_size,
        gist_rows=gist_rows,
        policy=policy,
    )


def uniform(coarse: Tiling, budget: int, tail: int, levels: int) -> Tiling:
    """The finest single level at which all older text fits (the caller checked `coarse`)."""
    n, b, r = coarse.lifetime, coarse.block_size, coarse.gist_rows
    for level in range(1, levels + 1):
        tiling = tiling_at_level(n, tail, level, b, r, coarse.frame_rows)
        if tiling.rows <= budget:
            return tiling
    return coarse


def random_fill(coarse: Tiling, budget: int, rng: np.random.Generator) -> Tiling:
    """Expand uniformly random gists of the coarsest tiling until no expansion fits."""
    b, r = coarse.block_size, coarse.gist_rows
    units = list(coarse.units)
    slack = budget - coarse.rows
    while True:
        fits = [p for p, u in enumerate(units) if u[0] >= 1 and expansion_cost(u, b, r) <= slack]
        if not fits:
            return coarse.with_units(units)
        p = fits[int(rng.integers(len(fits)))]
        slack -= expansion_cost(units[p], b, r)
        units[p : p + 1] = children(units[p], b)
