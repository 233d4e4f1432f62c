"""Retrieval: which old blocks the query asks for, and a tiling that shows them raw.

BM25 (over the tree's block index) ranks the complete blocks older than the raw region; the best
few are shown raw with their neighbours (a fact can straddle a block boundary), each by expanding
the gists that cover it level by level. This is the `retrieval`
policy, and the prior that `lens` starts from: LensNet only adds a learned residual to it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lens_serve.core.context import RECALL, Tiling, Unit, children, expansion_cost, raw_from
from lens_serve.core.tree import LifetimeTree


@dataclass(frozen=True)
class RetrievalConfig:
    blocks: int = 3
    """Best-ranked blocks shown raw per request (0: retrieve nothing)."""
    neighbours: int = 1
    """Blocks shown raw on either side of each retrieved block."""
    recall_blocks: int = 1
    """Best-ranked blocks a continuing session recalls, each with its neighbours: a recall's rows
    are new rows that the question's first token waits for."""
    recall_min_score: float = 12.0
    """Least BM25 score of a block a continuing session recalls. A recall recomputes the rows
    after it, so a match on a question's everyday words is not worth it (generic questions about a
    4k-token essay score 4-9); a question naming something rare in the session (a name split into
    rare pieces, a number, a term) scores far above (a needle question's fact block: 36)."""


PRIOR_SCORE = 1.0
"""The prior's score for a unit that covers a retrieved block (0 elsewhere), on a fresh WC: the
allocator keeps those blocks raw unless LensNet's residual outweighs it, and expands one that
the budget left as a gist."""


def retrieved_blocks(
    tree: LifetimeTree,
    query: np.ndarray,
    tail: int,
    config: RetrievalConfig,
    recall: bool = False,
) -> list[int]:
    """Indices of the blocks to show raw, most relevant first: the `config.blocks` best BM25
    blocks older than the raw region (ties: the newer first), each followed by its neighbours.
    `recall`: for a continuing session, the `config.recall_blocks` best scoring at least
    `config.recall_min_score`."""
    count, min_score = (
        (config.recall_blocks, config.recall_min_score) if recall else (config.blocks, 0.0)
    )
    first_raw = raw_from(tree.lifetime, tail, tree.block_size) // tree.block_size
    scores = tree.index.bm25(query)[:first_raw]  # (first_raw,)
    if not scores.size or scores.max() <= 0:
        return []
    order = np.lexsort((-np.arange(scores.size), -scores))  # best first, then newest first
    best = [int(i) for i in order[:count] if scores[i] > 0 and scores[i] >= min_score]
    out: list[int] = []
    for block in best:
        around = [block + d for d in range(-config.neighbours, config.neighbours + 1) if d]
        for j in (block, *around):
            if 0 <= j < first_raw and j not in out:
                out.append(j)
    return out


def show_blocks(tiling: Tiling, blocks: list[int], budget: int) -> Tiling:
    """Expand the gists covering each block in `blocks` (in order) down to raw tokens, while the
    budget allows; a block that no longer fits is skipped."""
    b, r = tiling.block_size, tiling.gist_rows
    units = list(tiling.units)
    slack = budget - tiling.rows
    for block in blocks:
        cost, trial = 0, units  # expand the unit holding the block, level by level, down to raw
        while True:
            p = _position(trial, block, b)
            if trial[p][0] == 0:
                break
            cost += expansion_cost(trial[p], b, r)
            trial = trial[:p] + children(trial[p], b) + trial[p + 1 :]
        if cost <= slack:
            units, slack = trial, slack - cost
    return tiling.with_units(units)


def _not_shown(tiling: Tiling, blocks: list[int]) -> list[int]:
    """The retrieved blocks (in rank order) that `tiling` shows neither raw nor recalled."""
    shown = {index for lod, index in tiling.units if lod <= 0}
    return [block for block in blocks if block not in shown]


def recall_rows(tiling: Tiling, blocks: list[int]) -> int:
    """Rows that recalling the retrieved blocks `tiling` does not show raw would take."""
    return tiling.block_size * len(_not_shown(tiling, blocks))


def recall(tiling: Tiling, blocks: list[int], budget: int, anchor: int) -> Tiling:
    """The retrieved blocks that `tiling` does not show raw, as recall units (best first while
    they fit the budget; placed in timeline order) just before the unit holding token `anchor`:
    the question's first token. A continuing session's rows before that stay as they were."""
    fits = max(budget - tiling.rows, 0) // tiling.block_size  # blocks the budget has room for
    missing = _not_shown(tiling, blocks)[:fits]
    if not missing:
        return tiling
    at = next(
        (p for p, unit in enumerate(tiling.units) if tiling.unit_span(unit)[1] > anchor),
        len(tiling.units),
    )
    units = [*tiling.units[:at], *((RECALL, b) for b in sorted(missing)), *tiling.units[at:]]
    out = tiling.with_units(units)
    if tiling.scores:
        out.scores = [*tiling.scores[:at], *[0.0] * len(missing), *tiling.scores[at:]]
    return out


def question_start(tree: LifetimeTree, query: np.ndarray, tail: int) -> int:
    """Where the query begins among the newest `tail` tokens (a new prompt, or a chat message in
    its template), else the lifetime's end."""
    n, q = tree.lifetime, len(query)
    if q == 0 or q > tail:
        return n
    window = tree.tokens(max(n - tail, 0), n)  # (<= tail,)
    if len(window) < q:
        return n
    runs = np.lib.stride_tricks.sliding_window_view(window, q)  # (len - q + 1, q)
    hits = np.flatnonzero((runs == query).all(axis=1))
    return n - len(window) + int(hits[-1]) if hits.size else n


def prior_scores(tiling: Tiling, blocks: list[int]) -> np.ndarray:
    """(U,) the prior: PRIOR_SCORE for every unit that covers a retrieved block, else 0."""
    out = np.zeros(len(tiling.units))
    if not blocks or not tiling.units:
        return out
    spans = np.array([tiling.unit_span(u) for u in tiling.units], dtype=np.int64)  # (U, 2)
    wanted = np.asarray(blocks, dtype=np.int64)[:, None] * tiling.block_size  # (K, 1) first tokens
    covers = ((wanted >= spans[:, 0]) & (wanted < spans[:, 1])).any(axis=0)  # (U,)
    out[covers] = PRIOR_SCORE
    return out


def _position(units: list[Unit], block: int, block_size: int) -> int:
    """Position of the unit whose span holds block `block` (units tile the lifetime in order)."""
    token = block * block_size
    for p, (lod, index) in enumerate(units):
        size = block_size ** max(lod, 1)
        if index * size <= token < (index + 1) * size:
            return p
    raise ValueError(f"block {block} is not covered by the tiling's units")
