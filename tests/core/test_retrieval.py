"""Retrieval: BM25's best blocks shown raw with their neighbours, and `lens` = that prior plus
LensNet's residual (an untrained LensNet chooses what `retrieval` does)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lens_serve.core import policies
from lens_serve.core.allocator import FocusConfig, lens_scores
from lens_serve.core.context import check_invariants
from lens_serve.core.lensnet import LensNet, LensNetConfig, UnitInputs
from lens_serve.core.policies import ContextChooser
from lens_serve.core.retrieval import RetrievalConfig, retrieved_blocks
from lens_serve.core.tree import LifetimeTree
from tests.core_helpers import HIDDEN, VOCAB, chooser, make_tree, node_counts

B, TAIL, BUDGET = 4, 16, 160
NEEDLE, OTHER = VOCAB - 1, VOCAB - 2  # ids make_tree's random text never uses below
# A needle in these small trees scores BM25 ~6: recall it (the default floor is for real text).
RECALL_ALL = RetrievalConfig(recall_min_score=5.0)


def haystack(lifetime: int, seed: int = 0) -> LifetimeTree:
    """Random text over ids [0, VOCAB - 2) in a tree; the caller plants needles."""
    tree = make_tree(0, block_size=B)
    tree.append(np.random.default_rng(seed).integers(0, VOCAB - 2, lifetime))
    return tree


def with_needles(lifetime: int, needles: dict[int, int], seed: int = 0) -> LifetimeTree:
    tokens = np.random.default_rng(seed).integers(0, VOCAB - 2, lifetime)
    for position, token in needles.items():
        tokens[position] = token
    tree = make_tree(0, block_size=B)
    tree.append(tokens)
    return tree


def lod_at(tree: LifetimeTree, policy: str, position: int, query: list[int]) -> int:
    wc = chooser().choose(tree, policy, BUDGET, TAIL, query=np.array(query)).working_context
    check_invariants(wc, BUDGET, TAIL, node_counts(tree))
    return int(wc.lods[np.searchsorted(wc.starts, position, side="right") - 1])


def test_retrieved_blocks_are_the_best_first_then_their_neighbours() -> None:
    tree = with_needles(4000, {402: NEEDLE, 2001: OTHER})
    blocks = retrieved_blocks(tree, np.array([NEEDLE, OTHER]), TAIL, RetrievalConfig(blocks=2))
    assert sorted(blocks[:3]) == [99, 100, 101] or sorted(blocks[:3]) == [499, 500, 501]
    assert set(blocks) == {99, 100, 101, 499, 500, 501}
    assert retrieved_blocks(tree, np.array([NEEDLE]), TAIL, RetrievalConfig(blocks=0)) == []


def test_retrieval_shows_a_deep_needle_raw_where_recency_and_uniform_cannot() -> None:
    tree = with_needles(6000, {1234: NEEDLE})
    assert lod_at(tree, "retrieval", 1234, [NEEDLE]) == 0
    assert lod_at(tree, "retrieval", 1234 - B, [NEEDLE]) == 0  # its neighbours too
    assert lod_at(tree, "retrieval", 1234 + B, [NEEDLE]) == 0
    assert lod_at(tree, "uniform", 1234, [NEEDLE]) > 0
    wc = chooser().choose(tree, "recency", BUDGET, TAIL).working_context
    assert wc.start > 1234


def test_the_choice_follows_the_query() -> None:
    tree = with_needles(6000, {1234: NEEDLE, 4321: OTHER})
    for policy in ("retrieval", "lens"):
        assert lod_at(tree, policy, 1234, [NEEDLE]) == 0
        assert lod_at(tree, policy, 1234, [OTHER]) > 0
        assert lod_at(tree, policy, 4321, [OTHER]) == 0


@settings(max_examples=30, deadline=None)
@given(
    lifetime=st.integers(300, 5000),
    seed=st.integers(0, 1000),
    query=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8),
)
def test_an_untrained_lens_chooses_what_retrieval_does(
    lifetime: int, seed: int, query: list[int]
) -> None:
    tree = haystack(lifetime, seed)
    untrained = ContextChooser(LensNet(LensNetConfig(hidden_size=HIDDEN, seed=seed)))
    words = np.array(query)
    lens = untrained.choose(tree, "lens", BUDGET, TAIL, query=words).working_context
    retrieval = untrained.choose(tree, "retrieval", BUDGET, TAIL, query=words).working_context
    assert lens.signature() == retrieval.signature()


def test_lens_scores_floor_the_units_the_prior_picked_only() -> None:
    prior = np.array([1.0, 1.0, 0.0, 0.0])
    residual = np.array([-0.9, 1.0, -2.0, 0.3])
    floor = FocusConfig(residual_deadband=0.0)
    assert lens_scores(prior, residual, floor).tolist() == pytest.approx([1.0, 2.0, -2.0, 0.3])
    no_floor = replace(floor, prior_floor=-math.inf)
    assert lens_scores(prior, residual, no_floor).tolist() == pytest.approx([0.1, 2.0, -2.0, 0.3])


def test_lens_scores_count_the_residual_only_past_the_deadband() -> None:
    prior = np.zeros(4)
    residual = np.array([0.2, -0.2, 0.7, -1.0])
    banded = FocusConfig(residual_deadband=0.5)
    assert lens_scores(prior, residual, banded).tolist() == pytest.approx([0.0, 0.0, 0.2, -0.5])


def test_a_residual_within_the_deadband_leaves_the_retrieval_choice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Small residuals of either sign all over the lifetime: what a residual trained on a few
    # records does on the units no record measured.
    def noisy(net: LensNet, inputs: UnitInputs) -> np.ndarray:
        return np.random.default_rng(len(inputs.lods)).uniform(-0.3, 0.3, len(inputs.lods))

    monkeypatch.setattr(policies, "score_units", noisy)
    tree = with_needles(6000, {1234: NEEDLE})
    net, words = LensNet(LensNetConfig(hidden_size=HIDDEN)), np.array([NEEDLE])
    retrieval = ContextChooser(net).choose(tree, "retrieval", BUDGET, TAIL, query=words)
    for band, same in ((0.0, False), (0.3, True)):
        lens = ContextChooser(net, FocusConfig(residual_deadband=band)).choose(
            tree, "lens", BUDGET, TAIL, query=words
        )
        signatures = (lens.working_context.signature(), retrieval.working_context.signature())
        assert (signatures[0] == signatures[1]) == same


def test_a_residual_cannot_collapse_the_retrieved_blocks_to_expand_gists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A residual that wants every gist finer and every raw block gone, the way one trained on a
    # few records wanted the neighbour holding half a fact gone.
    def eager(net: LensNet, inputs: UnitInputs) -> np.ndarray:
        return np.where(inputs.lods.numpy() == 0, -1.5, 1.5)

    monkeypatch.setattr(policies, "score_units", eager)
    tree = with_needles(6000, {1234: NEEDLE})
    net = LensNet(LensNetConfig(hidden_size=HIDDEN))
    for focus, kept in ((FocusConfig(), True), (FocusConfig(prior_floor=-math.inf), False)):
        wc = ContextChooser(net, focus).choose(tree, "lens", BUDGET, TAIL, query=np.array([NEEDLE]))
        lods = wc.working_context.lods[
            np.searchsorted(wc.working_context.starts, [1234 - B, 1234, 1234 + B], side="right") - 1
        ]
        assert (lods == 0).all() == kept, lods


@pytest.mark.parametrize("policy", ["lens", "retrieval"])
def test_the_same_query_gives_the_same_choice(policy: str) -> None:
    tree = with_needles(3000, {777: NEEDLE})
    first = chooser(2).choose(tree, policy, BUDGET, TAIL, query=np.array([NEEDLE, 3]))
    second = chooser(2).choose(tree, policy, BUDGET, TAIL, query=np.array([NEEDLE, 3]))
    assert first.working_context.signature() == second.working_context.signature()


def test_a_continuing_session_recalls_what_a_new_question_asks_for_keeping_its_prefix() -> None:
    tree = with_needles(6000, {1234: NEEDLE, 4321: OTHER})
    chooser_ = ContextChooser(LensNet(LensNetConfig(hidden_size=HIDDEN)), retrieval=RECALL_ALL)
    first = chooser_.choose(tree, "lens", BUDGET, TAIL, query=np.array([OTHER]))
    tree.append(np.array([7, 8, 9]))  # a turn about OTHER: the full WC refits to 3/4 W
    second = chooser_.choose(tree, "lens", BUDGET, TAIL, state=first.focus, query=np.array([OTHER]))
    assert second.focus is not None and not second.working_context.recalled.any()
    question = np.array([5, NEEDLE, 9])
    tree.append(question)
    third = chooser_.choose(tree, "lens", BUDGET, TAIL, state=second.focus, query=question)
    wc, before = third.working_context, second.working_context
    check_invariants(wc, BUDGET, TAIL, node_counts(tree))
    recalled = wc.starts[wc.recalled]
    assert 1234 in recalled and len(recalled) % B == 0  # the needle's block, whole, as a copy
    # Nothing before the recall changed: the cached prefix (all but the question's block) holds.
    first_recall = int(np.flatnonzero(wc.recalled)[0])
    keep = first_recall
    assert np.array_equal(wc.starts[:keep], before.starts[:keep])
    assert np.array_equal(wc.lods[:keep], before.lods[:keep])
    assert keep >= len(before.starts) - B  # at most the block holding the question moves
    # The recall sits just before the question's block: the question is the last thing read.
    assert wc.starts[first_recall + len(recalled)] <= 6000 <= wc.starts[-1] + 1
    spans = [s for s in wc.spans() if s.recalled]
    assert spans and all(s.lod == 0 for s in spans)


def test_a_refit_drops_earlier_recalls_first() -> None:
    tree = with_needles(6000, {1234: NEEDLE})
    chooser_ = ContextChooser(LensNet(LensNetConfig(hidden_size=HIDDEN)), retrieval=RECALL_ALL)
    state = chooser_.choose(tree, "lens", BUDGET, TAIL, query=np.array([1])).focus
    tree.append(np.array([NEEDLE]))
    state = chooser_.choose(tree, "lens", BUDGET, TAIL, state=state, query=np.array([NEEDLE])).focus
    assert state is not None and any(lod < 0 for lod, _ in state.tiling.units)
    tree.append(np.random.default_rng(1).integers(0, 100, BUDGET // 3))  # more than the headroom
    third = chooser_.choose(tree, "lens", BUDGET, TAIL, state=state, query=np.array([2]))
    check_invariants(third.working_context, BUDGET, TAIL, node_counts(tree))
