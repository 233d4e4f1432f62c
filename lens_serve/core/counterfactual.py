"""Per-unit counterfactuals: the served tiling with one unit changed, for the shadow scorer.

A gist is expanded into its children, a raw block collapsed into its gist; an expand that does not
fit the free rows is paid for by collapsing the least relevant raw blocks (BM25 of the query), as
the allocator pays for one with its lowest-scored spans. Which units are measured: the best
candidates by the retrieval prior's relevance, then LensNet's strongest wishes, then a few at
random (each with the probability it had), `UnitChoice` sets how many of each. Random variants of
several edits rarely touch the span a target depends on; measuring the units the prior and
LensNet point at, one at a time, gives each its own label."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lens_serve.core.context import Tiling, Unit, children, expansion_cost, raw_from


@dataclass(frozen=True)
class UnitChoice:
    prior_units: int = 4
    """Units measured because the retrieval prior ranks them most relevant."""
    lens_units: int = 2
    """Units measured because LensNet most wants to act on them (strongest scores)."""
    random_units: int = 2
    """Units measured uniformly at random among the other legal edits."""

    @classmethod
    def split(cls, units: int) -> UnitChoice:
        """`units` measured per request: half by the prior, a quarter by LensNet, the rest at
        random."""
        prior, lens = units // 2, units // 4
        return cls(prior, lens, units - prior - lens)

    @property
    def total(self) -> int:
        return self.prior_units + self.lens_units + self.random_units


@dataclass(frozen=True)
class UnitEdit:
    position: int  # the unit's position in the served tiling
    edit: str  # "expand" | "collapse"
    source: str  # "prior" | "lens" | "random"
    probability: float  # chance `source` picked it
    tiling: Tiling  # the served tiling with the change (and its funding collapses)
    funding: int  # raw blocks collapsed to pay for an expand


def unit_relevance(tiling: Tiling, block_scores: np.ndarray) -> np.ndarray:
    """(U,) the best BM25 score of the blocks each unit covers. block_scores: (blocks,)."""
    b = tiling.block_size
    out = np.zeros(len(tiling.units))
    for k, unit in enumerate(tiling.units):
        start, end = tiling.unit_span(unit)
        covered = block_scores[start // b : min(end // b, len(block_scores))]
        out[k] = float(covered.max()) if covered.size else 0.0
    return out


def unit_edits(
    tiling: Tiling,
    budget: int,
    tail: int,
    node_counts: list[int],
    relevance: np.ndarray,
    lens_scores: np.ndarray | None,
    choice: UnitChoice,
    rng: np.random.Generator,
) -> list[UnitEdit]:
    """The measured one-unit changes of `tiling`. relevance, lens_scores: (U,) each."""
    legal = _legal_edits(tiling, tail, node_counts)  # position -> "expand" | "collapse"
    picked: list[tuple[int, str, float]] = []  # (position, source, probability)

    def take(order: list[int], source: str, count: int) -> None:
        taken = 0
        for p in order:
            if taken == count:
                return
            if p in legal and all(p != q for q, _, _ in picked):
                picked.append((p, source, 1.0))
                taken += 1

    # Prior: the most relevant units (expanding a relevant gist, collapsing a relevant raw block).
    take(sorted(legal, key=lambda p: (-relevance[p], -p)), "prior", choice.prior_units)
    if lens_scores is not None:  # LensNet: expand what it scores highest, collapse the lowest
        wish = {p: lens_scores[p] if e == "expand" else -lens_scores[p] for p, e in legal.items()}
        take(sorted(legal, key=lambda p: (-wish[p], -p)), "lens", choice.lens_units)
    for _ in range(choice.random_units):
        rest = [p for p in legal if all(p != q for q, _, _ in picked)]
        if not rest:
            break
        picked.append((rest[int(rng.integers(len(rest)))], "random", 1.0 / len(rest)))

    # The blocks an expand may collapse to pay for itself, least relevant (then oldest) first.
    payers = sorted(
        (p for p, e in legal.items() if e == "collapse"), key=lambda p: (relevance[p], p)
    )
    out = []
    for position, source, probability in picked:
        edit = legal[position]
        if edit == "collapse":
            units = list(tiling.units)
            units[position] = (1, units[position][1])
            out.append(UnitEdit(position, edit, source, probability, tiling.with_units(units), 0))
            continue
        funded = _expand(tiling, position, budget, payers)
        if funded is not None:
            out.append(UnitEdit(position, edit, source, probability, funded[0], funded[1]))
    return out


def _legal_edits(tiling: Tiling, tail: int, node_counts: list[int]) -> dict[int, str]:
    """Gists can be expanded; a raw timeline block older than the tail can become its gist."""
    first_raw = raw_from(tiling.lifetime, tail, tiling.block_size) // tiling.block_size
    out = {}
    for p, (lod, index) in enumerate(tiling.units):
        if lod >= 1:
            out[p] = "expand"
        elif lod == 0 and index < first_raw and len(node_counts) > 1 and index < node_counts[1]:
            out[p] = "collapse"
    return out


def _expand(
    tiling: Tiling, position: int, budget: int, payers: list[int]
) -> tuple[Tiling, int] | None:
    """`tiling` with unit `position` expanded, paid for by collapsing raw blocks at `payers` in
    order as far as needed; None if the budget cannot be met."""
    b, r = tiling.block_size, tiling.gist_rows
    unit = tiling.units[position]
    slack = budget - tiling.rows - expansion_cost(unit, b, r)
    collapsed: list[int] = []
    for p in payers:
        if slack >= 0:
            break
        collapsed.append(p)
        slack += b - r
    if slack < 0:
        return None
    units: list[Unit] = []
    for p, u in enumerate(tiling.units):
        if p == position:
            units.extend(children(u, b))
        else:
            units.append((1, u[1]) if p in collapsed else u)
    return tiling.with_units(units), len(collapsed)
