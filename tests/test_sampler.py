from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lens_serve.context import check_invariants, coarsest_tiling, fill_newest_first
from lens_serve.sampler import sample_variant
from tests.core_helpers import make_tree, node_counts


@settings(max_examples=40, deadline=None)
@given(
    lifetime=st.integers(100, 3000),
    budget=st.integers(150, 400),
    n_edits=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_variants_are_legal_and_record_edit_probabilities(
    lifetime: int, budget: int, n_edits: int, seed: int
) -> None:
    tree = make_tree(lifetime, block_size=4)
    coarse = coarsest_tiling(lifetime, 16, tree.levels, 4, 1)
    base = fill_newest_first(coarse, budget)
    variant = sample_variant(
        base, budget, 16, node_counts(tree), np.random.default_rng(seed), n_edits
    )
    check_invariants(variant.tiling.to_working_context("random"), budget, 16, node_counts(tree))
    assert len(variant.edits) <= n_edits
    assert all(0 < e.probability <= 1 for e in variant.edits)
    assert math.isclose(variant.log_prob, sum(math.log(e.probability) for e in variant.edits))


def test_same_seed_same_variant_and_different_seed_differs() -> None:
    tree = make_tree(3000, block_size=4)
    base = fill_newest_first(coarsest_tiling(3000, 16, tree.levels, 4, 1), 300)
    counts = node_counts(tree)

    def draw(seed: int) -> list[tuple[int, int]]:
        return sample_variant(base, 300, 16, counts, np.random.default_rng(seed), 3).tiling.units

    assert draw(1) == draw(1)
    assert any(draw(1) != draw(s) for s in range(2, 6))
