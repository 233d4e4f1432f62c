from __future__ import annotations

import numpy as np
import pytest

from lens_serve.core.allocator import FocusConfig, FocusState, refocus
from lens_serve.core.context import Tiling, check_invariants, coarsest_tiling, fill_newest_first
from lens_serve.errors import InvalidRequest
from tests.core_helpers import NO_RETRIEVAL, chooser, make_tree, node_counts

B = 4


def _start(lifetime: int, budget: int, tail: int) -> tuple[FocusState, list[int]]:
    tree = make_tree(lifetime, block_size=B)
    coarse = coarsest_tiling(lifetime, tail, tree.levels, B, 1)
    return FocusState(fill_newest_first(coarse, budget)), node_counts(tree)


def test_zero_scores_change_nothing_within_budget() -> None:
    state, counts = _start(2000, 300, 16)
    new, stats = refocus(
        state, np.zeros(len(state.tiling.units)), 300, 16, counts, FocusConfig(), False
    )
    assert new.tiling.units == state.tiling.units
    assert (stats.expands, stats.collapses, stats.forced_collapses) == (0, 0, 0)


def test_high_score_on_an_old_gist_expands_it_paid_by_low_scores() -> None:
    state, counts = _start(2000, 300, 16)
    units = state.tiling.units
    scores = np.full(len(units), -0.5)
    oldest_gist = 0
    scores[oldest_gist] = 2.0
    new, stats = refocus(state, scores, 300, 16, counts, FocusConfig(), fresh=True)
    assert units[oldest_gist] not in new.tiling.units
    assert stats.expands >= 1 and stats.collapses >= 1
    assert new.tiling.rows <= 300
    check_invariants(new.tiling.to_working_context("lens"), 300, 16, counts)


def test_edits_per_step_are_capped() -> None:
    state, counts = _start(3000, 400, 16)
    scores = np.where([u[0] >= 1 for u in state.tiling.units], 3.0, -3.0)
    config = FocusConfig(max_edits=3)
    _, stats = refocus(state, scores, 400, 16, counts, config, fresh=False)
    assert 0 < stats.expands + stats.collapses <= 3


def test_deadband_blocks_swaps_between_close_scores() -> None:
    state, counts = _start(2000, 300, 16)
    scores = np.full(len(state.tiling.units), 0.15)  # above the expand threshold, all equal
    _, stats = refocus(state, scores, 300, 16, counts, FocusConfig(), fresh=True)
    assert stats.collapses == 0  # equal scores never pay for each other


def test_new_tokens_over_budget_collapse_near_the_tail_to_keep_the_prefix() -> None:
    tree = make_tree(2000, block_size=B)
    chooser_ = chooser(focus=FocusConfig(refit_headroom=0), retrieval=NO_RETRIEVAL)  # least needed
    chooser_.lensnet.head.weight.data.zero_()  # flat scores: only the cache cost decides
    chooser_.lensnet.head.bias.data.zero_()
    first = chooser_.choose(tree, "lens", 300, 16)
    tree.append(np.arange(40) % 500)
    second = chooser_.choose(tree, "lens", 300, 16, state=first.focus)
    assert second.stats is not None and second.stats.forced_collapses > 0
    a, b = first.working_context, second.working_context
    n = min(len(a.lods), len(b.lods))
    changed = np.flatnonzero((a.lods[:n] != b.lods[:n]) | (a.starts[:n] != b.starts[:n]))
    first_changed = int(changed[0]) if len(changed) else n
    assert first_changed > 0.8 * len(a.lods)  # the edits happened near the end


def test_a_refit_leaves_headroom_so_the_next_turns_only_append() -> None:
    tree = make_tree(2000, block_size=B)
    chooser_ = chooser(retrieval=NO_RETRIEVAL)  # the allocator's own refit, without recalls
    chooser_.lensnet.head.weight.data.zero_()
    chooser_.lensnet.head.bias.data.zero_()
    turn = chooser_.choose(tree, "lens", 300, 16)
    assert turn.working_context.rows > 290  # a fresh WC uses the whole budget
    tree.append(np.arange(40) % 500)
    turn = chooser_.choose(tree, "lens", 300, 16, state=turn.focus)
    headroom = int(FocusConfig().refit_headroom * 300)
    assert turn.working_context.rows <= 300 - headroom
    for _ in range(3):  # 3 x 20 new rows fit in the headroom: no edit, the prefix stays
        tree.append(np.arange(20) % 500)
        before = turn.working_context
        turn = chooser_.choose(tree, "lens", 300, 16, state=turn.focus)
        assert turn.stats is not None and turn.stats.forced_collapses == 0
        after = turn.working_context
        n = len(before.lods)
        assert len(after.lods) == n + 20  # the old WC is a prefix of the new one
        np.testing.assert_array_equal(after.lods[:n], before.lods)
        np.testing.assert_array_equal(after.starts[:n], before.starts)


def test_cooldown_prevents_undoing_a_fresh_edit() -> None:
    state, counts = _start(2000, 300, 16)
    units = state.tiling.units
    scores = np.full(len(units), -0.5)
    scores[0] = 2.0
    expanded, _ = refocus(state, scores, 300, 16, counts, FocusConfig(), fresh=True)
    children = [u for u in expanded.tiling.units if u not in units]
    assert children and all(u in expanded.created_at for u in children)
    # Next step: the children score terribly, but they are cooling down, so they stay.
    back = np.array([-5.0 if u in children else 0.5 for u in expanded.tiling.units])
    again, _ = refocus(expanded, back, 300, 16, counts, FocusConfig(), fresh=False)
    assert all(u in again.tiling.units for u in children)


def test_budget_that_cannot_hold_the_lifetime_is_an_invalid_request() -> None:
    state, counts = _start(2000, 300, 16)
    with pytest.raises(InvalidRequest, match="wc_budget"):
        refocus(state, np.zeros(len(state.tiling.units)), 20, 16, counts, FocusConfig(), True)


def test_tiling_rows_count_raw_blocks_gists_and_the_partial_block() -> None:
    tiling = Tiling([(2, 0), (1, 4), (0, 5)], lifetime=26, block_size=B, gist_rows=2)
    assert tiling.rows == 2 + 2 + 4 + 2
    assert tiling.to_working_context("lens").rows == tiling.rows
