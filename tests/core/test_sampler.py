from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lens_serve.core.context import check_invariants, coarsest_tiling, fill_newest_first
from lens_serve.core.sampler import sample_variant
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


def test_a_guide_draws_edits_toward_its_unit_and_records_the_mixed_probability() -> None:
    tree = make_tree(3000, block_size=4)
    base = fill_newest_first(coarsest_tiling(3000, 16, tree.levels, 4, 1), 300)
    counts = node_counts(tree)
    budget = base.rows + 40  # room for expands, so most legal edits are expands
    target = next(p for p, u in enumerate(base.units) if u[0] == 1)
    guide = np.zeros(len(base.units))
    guide[target] = 1.0

    def first_edit(seed: int, share: float) -> tuple[tuple[int, int], float]:
        rng = np.random.default_rng(seed)
        edit = sample_variant(base, budget, 16, counts, rng, 1, guide, share).edits[0]
        return edit.unit, edit.probability

    guided = [first_edit(seed, 0.5) for seed in range(40)]
    hits = [p for unit, p in guided if unit == base.units[target]]
    assert len(hits) > 15  # about half of the draws (plus its uniform share)
    # Half the mass is uniform over the legal edits, the guided half almost all on the target.
    uniform = [first_edit(seed, 0.0) for seed in range(40)]
    total = round(1 / uniform[0][1])
    assert all(math.isclose(p, 1 / total) for _, p in uniform)
    softmax = 1 / (1 + (total - 1) * math.exp(-1.0 / 0.1))  # every other key is 0, tau 0.1
    assert math.isclose(hits[0], 0.5 / total + 0.5 * softmax, rel_tol=1e-6)
    assert sum(unit == base.units[target] for unit, _ in uniform) < 5
