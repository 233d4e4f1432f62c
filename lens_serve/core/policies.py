"""Policies: how a working context is chosen for a request.

- `retrieval`: the blocks BM25 ranks best for the query shown raw with their neighbours (see
  `retrieval`), everything else newest-first at the finest level that fits, the raw tail always.
- `lens`: the retrieval prior plus LensNet's learned residual, through the focus allocator. A
  fresh choice starts from the `retrieval` tiling; a session's later requests continue its previous
  choice (so its cached prefix stays as it was), and the blocks a new question asks for are
  recalled (raw copies) just before it. An untrained LensNet (zero residual) chooses exactly what
  `retrieval` does on a fresh choice.
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

from lens_serve.core.allocator import EditStats, FocusConfig, FocusState, lens_scores, refocus
from lens_serve.core.context import (
    RECALL,
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
from lens_serve.core.lensnet import LensNet, default_query, score_units, unit_inputs
from lens_serve.core.retrieval import (
    RetrievalConfig,
    prior_scores,
    question_start,
    recall,
    recall_rows,
    retrieved_blocks,
    show_blocks,
)
from lens_serve.core.tree import LifetimeTree
from lens_serve.errors import InvalidRequest

POLICIES = ("lens", "recency", "uniform", "random", "full", "retrieval")
"""In the order of the wire's Policy enum values (1..6)."""


@dataclass(frozen=True)
class Choice:
    working_context: WorkingContext
    focus: FocusState | None  # the lens policy's state to keep for the session's next request
    stats: EditStats | None
    choice_ms: float


class ContextChooser:
    """Chooses working contexts with one LensNet (swap the chooser to swap LensNet versions)."""

    def __init__(
        self,
        lensnet: LensNet,
        focus: FocusConfig | None = None,
        retrieval: RetrievalConfig | None = None,
    ) -> None:
        self.lensnet = lensnet
        self.lens_version = lensnet.version  # hashed once: the weights never change in place
        self.focus = focus or FocusConfig()
        self.retrieval = retrieval or RetrievalConfig()

    def choose(
        self,
        tree: LifetimeTree,
        policy: str,
        budget: int,
        tail: int,
        *,
        seed: int = 0,
        state: FocusState | None = None,
        query: np.ndarray | None = None,
    ) -> Choice:
        """`query`: token ids of what the request asks (None: the newest tokens)."""
        began = time.perf_counter()
        n = tree.lifetime
        words = default_query(tree) if query is None else np.asarray(query, dtype=np.int64)
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
            elif policy == "retrieval":
                blocks = retrieved_blocks(tree, words, tail, self.retrieval)
                wc = retrieval(coarse, blocks, budget).to_working_context("retrieval")
            else:
                focus, stats = self._lens(tree, coarse, budget, tail, state, words)
                wc = focus.tiling.to_working_context("lens", self.lens_version)
        return Choice(wc, focus, stats, (time.perf_counter() - began) * 1e3)

    def _lens(
        self,
        tree: LifetimeTree,
        coarse: Tiling,
        budget: int,
        tail: int,
        state: FocusState | None,
        query: np.ndarray | None,
    ) -> tuple[FocusState, EditStats]:
        """`query` None: no question to recall for (a refit ahead of the next turn)."""
        fresh = not _continues(state, tree, budget, tail)
        blocks = []
        if query is not None:
            blocks = retrieved_blocks(tree, query, tail, self.retrieval, recall=not fresh)
        room = budget  # what the allocator may fill (a continuing session keeps room to recall)
        if fresh or state is None:
            state = FocusState(retrieval(coarse, blocks, budget))
            prior = blocks
        else:
            tiling = extend_tiling(state.tiling, tree.lifetime)
            # Expanding old gists in place would recompute every cached row after them: the new
            # question's blocks are recalled next to it instead, after the allocator's step. If
            # they do not fit, the allocator refits to make room, and earlier recalls go first
            # (the allocator never collapses them).
            room = budget - recall_rows(tiling, blocks)
            if tiling.rows > room:
                tiling = tiling.with_units([u for u in tiling.units if u[0] != RECALL])
                room = budget - recall_rows(tiling, blocks)
            if room < coarse.rows:  # even the coarsest tiling leaves no room: recall what fits
                room = budget
            state = FocusState(tiling, state.step, state.created_at)
            prior = []
        node_counts = [tree.node_count(k) for k in range(tree.levels + 1)]
        # Each round scores the units the previous one revealed (prior + LensNet's residual), so a
        # span deep in the oldest gist can reach raw tokens in one request. The cooldown guards a
        # session's turns against flapping; within one choice, refining a unit just made is the
        # point, so every round starts without it and the units made by all rounds are protected
        # from the next turn on.
        made: set[Unit] = set()
        kept = dict(state.created_at)
        totals = np.zeros(3, dtype=np.int64)  # expands, collapses, forced collapses
        # A continuing session takes one step per turn (its edits cost cached rows).
        for round_ in range(self.focus.fresh_rounds if fresh else 1):
            prior_score = prior_scores(state.tiling, prior)
            inputs = unit_inputs(tree, state.tiling, tail, query)
            residual = score_units(self.lensnet, inputs)[: len(state.tiling.units)]
            state, stats = refocus(
                FocusState(state.tiling, state.step, kept if round_ == 0 else {}),
                lens_scores(prior_score, residual, self.focus),
                room,
                tail,
                node_counts,
                self.focus,
                fresh,
            )
            made.update(u for u, s in state.created_at.items() if s == state.step)
            totals += (stats.expands, stats.collapses, stats.forced_collapses)
            if stats.expands + stats.collapses + stats.forced_collapses == 0:
                break
        created = {u: s for u, s in kept.items() if state.step - s < self.focus.cooldown_steps}
        created.update(dict.fromkeys(made, state.step))
        tiling = state.tiling
        if not fresh and query is not None:
            tiling = recall(tiling, blocks, budget, question_start(tree, query, tail))
        return FocusState(tiling, state.step, created), EditStats(*(int(t) for t in totals))

    def anticipate(
        self, tree: LifetimeTree, budget: int, tail: int, state: FocusState, reserve: int
    ) -> FocusState | None:
        """The `lens` state a session's next turn should continue from, refit now when the next
        turn's `reserve` new tokens would not fit; None when the next turn will not need a refit
        (or cannot continue `state` at all). A refit recomputes every row after its first edit, so
        it belongs in the time the user reads an answer, not before the next first token."""
        if not _continues(state, tree, budget, tail):
            return None
        if extend_tiling(state.tiling, tree.lifetime).rows + reserve <= budget:
            return None
        b, r, f = tree.block_size, tree.gist_rows, tree.frame_rows
        coarse = coarsest_tiling(tree.lifetime, tail, tree.levels, b, r, f)
        if coarse.rows + reserve > budget:
            return None  # the next turn must refit whatever is done now
        anticipated, _ = self._lens(tree, coarse, budget - reserve, tail, state, None)
        return anticipated


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
    if policy in ("lens", "uniform", "random", "retrieval"):
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
    return all(lod <= 0 or old.unit_span((lod, i))[1] <= first_tail_token for lod, i in old.units)


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


def retrieval(coarse: Tiling, blocks: list[int], budget: int) -> Tiling:
    """The retrieved blocks raw (with their neighbours), then the rest newest-first."""
    return fill_newest_first(show_blocks(coarse, blocks, budget), budget)


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
