"""Every policy holds every docs/design.md §2 invariant, for random lifetimes, budgets, tails and
scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lens_serve.core.allocator import FocusConfig, FocusState
from lens_serve.core.assembly import assemble, layout, shown_token_ids
from lens_serve.core.context import check_invariants, coarsest_tiling, extend_tiling
from lens_serve.core.lensnet import LensNet, LensNetConfig
from lens_serve.core.policies import POLICIES, ContextChooser
from lens_serve.core.retrieval import RetrievalConfig
from lens_serve.errors import InvalidRequest
from tests.core_helpers import (
    HIDDEN,
    LIST_CLOSER,
    LIST_OPENER,
    NO_RETRIEVAL,
    chooser,
    make_tree,
    node_counts,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(
    lifetime=st.integers(0, 3000),
    budget=st.integers(2, 400),
    tail=st.integers(0, 120),
    block_size=st.sampled_from([2, 4, 8]),
    rows=st.sampled_from([1, 2]),
    policy=st.sampled_from(POLICIES),
    seed=st.integers(0, 2**16),
    listed=st.booleans(),
)
def test_policy_holds_invariants_for_random_inputs(
    lifetime: int,
    budget: int,
    tail: int,
    block_size: int,
    rows: int,
    policy: str,
    seed: int,
    listed: bool,
) -> None:
    assume(tail < budget)
    tree = make_tree(lifetime, block_size, rows, seed=seed % 7, listed=listed)
    coarse = coarsest_tiling(lifetime, tail, tree.levels, block_size, rows, tree.frame_rows)
    needs_whole = policy in ("lens", "uniform", "random", "retrieval")
    expect_error = (needs_whole and coarse.rows > budget) or (
        policy == "full" and lifetime > budget
    )
    chooser_ = chooser(seed)
    if expect_error:
        with pytest.raises(InvalidRequest, match="wc_budget"):
            chooser_.choose(tree, policy, budget, tail, seed=seed)
        return
    wc = chooser_.choose(tree, policy, budget, tail, seed=seed).working_context
    check_invariants(wc, budget, tail, node_counts(tree))
    if needs_whole or policy == "full":
        assert wc.start == 0  # these cover the whole lifetime
    embeds = assemble(tree, wc)
    assert embeds.shape == (wc.rows, tree.table.hidden_size)
    # Raw rows are exactly the tokens they stand for.
    shown = shown_token_ids(tree, wc)
    raw_rows = layout(tree, wc).offsets[wc.lods == 0]
    assert np.array_equal(shown[raw_rows], tree.tokens()[wc.starts[wc.lods == 0]])


@SETTINGS
@given(
    lifetime=st.integers(200, 2500),
    growth=st.lists(st.integers(1, 150), min_size=1, max_size=5),
    budget=st.integers(120, 500),
    tail=st.integers(0, 60),
    seed=st.integers(0, 2**16),
    listed=st.booleans(),
)
def test_lens_policy_continuing_a_session_holds_invariants(
    lifetime: int, growth: list[int], budget: int, tail: int, seed: int, listed: bool
) -> None:
    tree = make_tree(lifetime, block_size=4, seed=seed % 5, listed=listed)
    chooser_ = chooser(seed)
    assume(coarsest_tiling(lifetime + sum(growth), tail, 9, 4, 1).rows <= budget // 2)
    state: FocusState | None = None
    rng = np.random.default_rng(seed)
    for step in [0, *growth]:
        tree.append(rng.integers(0, 512, step))
        choice = chooser_.choose(tree, "lens", budget, tail, state=state)
        check_invariants(choice.working_context, budget, tail, node_counts(tree))
        assert choice.working_context.start == 0
        state = choice.focus


@SETTINGS
@given(
    lifetime=st.integers(300, 2500),
    prompt=st.integers(1, 40),
    answer=st.integers(1, 40),
    budget=st.integers(120, 400),
    tail=st.integers(0, 60),
    seed=st.integers(0, 2**16),
)
def test_a_refit_ahead_of_the_next_turn_leaves_that_turn_only_appending(
    lifetime: int, prompt: int, answer: int, budget: int, tail: int, seed: int
) -> None:
    """`anticipate` refits while the user reads the answer; the next turn (a prompt of the same
    length) then starts with exactly the rows prefilled after the previous one. (A question that
    recalls old blocks edits on purpose: recalls are off here.)"""
    turns = 6
    assume(coarsest_tiling(lifetime + turns * (prompt + answer), tail, 9, 4, 1).rows <= budget // 2)
    tree = make_tree(lifetime, block_size=4, seed=seed % 5)
    untrained = ContextChooser(
        LensNet(LensNetConfig(hidden_size=HIDDEN, width=16, heads=2)), retrieval=NO_RETRIEVAL
    )
    rng = np.random.default_rng(seed)
    prefilled = None
    for _ in range(turns):
        tree.append(rng.integers(0, 512, prompt))
        choice = untrained.choose(tree, "lens", budget, tail, state=prefilled)
        wc = choice.working_context
        check_invariants(wc, budget, tail, node_counts(tree))
        if prefilled is not None:
            before = extend_tiling(prefilled.tiling, tree.lifetime - prompt).to_working_context("")
            assert np.array_equal(wc.lods[: before.rows], before.lods)
            assert np.array_equal(wc.starts[: before.rows], before.starts)
        tree.append(rng.integers(0, 512, answer))
        assert choice.focus is not None
        refit = untrained.anticipate(tree, budget, tail, choice.focus, prompt)
        if refit is not None:
            check_invariants(
                refit.tiling.to_working_context(""), budget - prompt, tail, node_counts(tree)
            )
        prefilled = refit or choice.focus


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_is_deterministic_for_same_inputs(policy: str) -> None:
    tree = make_tree(1500, block_size=4)
    first = chooser(3).choose(tree, policy, 1600 if policy == "full" else 300, 20, seed=9)
    second = chooser(3).choose(tree, policy, 1600 if policy == "full" else 300, 20, seed=9)
    assert first.working_context.signature() == second.working_context.signature()


def test_random_policy_differs_across_seeds() -> None:
    tree = make_tree(3000, block_size=4)
    a = chooser().choose(tree, "random", 300, 20, seed=1).working_context
    b = chooser().choose(tree, "random", 300, 20, seed=2).working_context
    assert a.signature() != b.signature()


@pytest.mark.parametrize(
    ("budget", "tail", "field"),
    [(0, 0, "wc_budget"), (10, 10, "wc_budget"), (10, 20, "wc_budget"), (10, -1, "tail")],
)
def test_invalid_budget_or_tail_raises_naming_the_field(budget: int, tail: int, field: str) -> None:
    tree = make_tree(100)
    with pytest.raises(InvalidRequest, match=field) as raised:
        chooser().choose(tree, "lens", budget, tail)
    assert raised.value.field == field


def test_unknown_policy_raises_naming_the_field() -> None:
    with pytest.raises(InvalidRequest, match="policy"):
        chooser().choose(make_tree(100), "smart", 64, 8)


def test_budget_below_coarsest_tiling_names_the_minimum() -> None:
    tree = make_tree(5000, block_size=4)
    with pytest.raises(InvalidRequest, match="at least"):
        chooser().choose(tree, "lens", 40, 30)


def test_recency_keeps_the_newest_budget_tokens() -> None:
    tree = make_tree(1000)
    wc = chooser().choose(tree, "recency", 256, 16).working_context
    assert wc.rows == 256 and wc.start == 1000 - 256 and wc.gist_covered_tokens == 0


def test_uniform_uses_one_level_for_older_text() -> None:
    tree = make_tree(4096, block_size=4)
    wc = chooser().choose(tree, "uniform", 1100, 16).working_context
    old = wc.lods[wc.ends <= 4096 - 16 - 4]
    assert set(old.tolist()) == {1}  # 4096 / 4 = 1024 LOD1 gists fit in 1100 rows


class QuerySeekingLensNet(LensNet):
    """Asks to expand exactly the units that hold the query's rarest word (match feature)."""

    def forward(
        self, content: torch.Tensor, lods: torch.Tensor, features: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        match = features[..., -1]  # (B, U)
        return torch.where(match > 0.5, 1.0, -1.0)


def test_a_fresh_lens_choice_refines_a_deep_span_down_to_raw_tokens() -> None:
    b, tail, budget = 4, 8, 48
    tree = make_tree(0, block_size=b, rows=1)
    tokens = np.random.default_rng(0).integers(0, 2, 1024)  # common words: in most blocks
    needle = 500  # the only occurrence of token 500 besides the question at the tail
    tokens[6], tokens[-3] = needle, needle
    tree.append(tokens)
    net = QuerySeekingLensNet(LensNetConfig(hidden_size=HIDDEN, width=8, heads=2))

    def lod_of_the_needle(rounds: int) -> int:
        # No retrieval prior: this is about what LensNet's own scores reach.
        chooser_ = ContextChooser(net, FocusConfig(fresh_rounds=rounds), RetrievalConfig(blocks=0))
        wc = chooser_.choose(tree, "lens", budget, tail).working_context
        check_invariants(wc, budget, tail, node_counts(tree))
        return int(wc.lods[np.searchsorted(wc.starts, 6, side="right") - 1])

    # Block 1 sits at LOD 4 in the newest-first tiling. Each round scores the children the last
    # one revealed, one level further down: four rounds reach the raw tokens.
    assert coarsest_tiling(1024, tail, tree.levels, b, 1).units[0][0] == 4
    assert [lod_of_the_needle(r) for r in (1, 2, 4)] == [3, 2, 0]


def test_the_frame_opens_before_the_first_gist_and_closes_after_the_last() -> None:
    tree = make_tree(600, block_size=4, rows=1, listed=True)
    wc = chooser().choose(tree, "lens", 120, 16).working_context
    gists = np.flatnonzero(wc.lods > 0)
    assert len(gists) and wc.rows == wc.entry_rows.sum() + len(LIST_OPENER) + len(LIST_CLOSER)
    shown = shown_token_ids(tree, wc)
    offsets = layout(tree, wc).offsets
    first, last = offsets[gists[0]], offsets[gists[-1]] + 1
    assert shown[first - 1] == LIST_OPENER[0] and tuple(shown[last : last + 2]) == LIST_CLOSER
    assert len(shown) == len(assemble(tree, wc)) == wc.rows
    everything_raw = chooser().choose(tree, "full", 600, 16).working_context
    assert everything_raw.rows == 600 and len(shown_token_ids(tree, everything_raw)) == 600
