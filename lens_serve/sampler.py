"""Random variants of a tiling, for shadow scoring and training.

Each step picks one edit uniformly among all legal ones (expands that fit the free rows and
collapses of whole sibling groups outside the tail) and records its probability, so a preference
record carries exactly how likely its variant was under the sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lens_serve.allocator import collapse_candidates
from lens_serve.context import Tiling, Unit, children, expansion_cost


@dataclass(frozen=True)
class SampledEdit:
    kind: str  # "expand" | "collapse"
    unit: Unit  # the unit expanded, or the parent a group collapsed into
    probability: float


@dataclass(frozen=True)
class Variant:
    tiling: Tiling
    edits: tuple[SampledEdit, ...]

    @property
    def log_prob(self) -> float:
        return sum(math.log(e.probability) for e in self.edits)


def sample_variant(
    tiling: Tiling,
    budget: int,
    tail: int,
    node_counts: list[int],
    rng: np.random.Generator,
    n_edits: int,
) -> Variant:
    """Apply up to `n_edits` uniformly random legal edits (fewer if none is legal)."""
    b, r = tiling.block_size, tiling.gist_rows
    units = list(tiling.units)
    edits: list[SampledEdit] = []
    for _ in range(n_edits):
        current = Tiling(units, tiling.lifetime, b, r)
        slack = budget - current.rows
        expands = [p for p, u in enumerate(units) if u[0] >= 1 and expansion_cost(u, b, r) <= slack]
        zeros = np.zeros(len(units))
        collapses = collapse_candidates(current, zeros, node_counts, tail, zeros)
        total = len(expands) + len(collapses)
        if total == 0:
            break
        pick = int(rng.integers(total))
        if pick < len(expands):
            p = expands[pick]
            edits.append(SampledEdit("expand", units[p], 1.0 / total))
            units[p : p + 1] = children(units[p], b)
        else:
            c = collapses[pick - len(expands)]
            edits.append(SampledEdit("collapse", c.parent, 1.0 / total))
            units[c.position : c.position + c.length] = [c.parent]
    return Variant(Tiling(units, tiling.lifetime, b, r), tuple(edits))
