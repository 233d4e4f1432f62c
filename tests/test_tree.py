from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lens_serve.gistnet import GIST_KINDS, GistKind
from tests.core_helpers import VOCAB, make_tree


@settings(max_examples=25, deadline=None)
@given(
    chunks=st.lists(st.integers(0, 300), min_size=1, max_size=8),
    kind=st.sampled_from(GIST_KINDS),
    rows=st.sampled_from([1, 2]),
)
def test_incremental_tree_equals_tree_built_in_one_go(
    chunks: list[int], kind: GistKind, rows: int
) -> None:
    tokens = np.random.default_rng(sum(chunks)).integers(0, VOCAB, sum(chunks))
    whole = make_tree(0, block_size=4, rows=rows, kind=kind)
    whole.append(tokens)
    pieces = make_tree(0, block_size=4, rows=rows, kind=kind)
    at = 0
    for size in chunks:
        pieces.append(tokens[at : at + size])
        at += size
    assert pieces.levels == whole.levels
    assert np.array_equal(pieces.tokens(), whole.tokens())
    for level in range(1, whole.levels + 1):
        index = np.arange(whole.node_count(level))
        assert pieces.node_count(level) == whole.node_count(level)
        a, b = pieces.gist_embeds(level, index), whole.gist_embeds(level, index)
        if kind == "transformer":  # batched matmuls may round differently by batch size
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a, b)
        assert torch.equal(pieces.gist_token_ids(level, index), whole.gist_token_ids(level, index))


def test_levels_appear_as_the_lifetime_grows() -> None:
    tree = make_tree(0, block_size=4)
    counts = []
    for _ in range(70):
        tree.append([1])
        counts.append(tree.levels)
    assert counts[2] == 0 and counts[3] == 1 and counts[15] == 2 and counts[63] == 3


def test_tokens_gist_shows_the_blocks_highest_ranked_tokens_in_order() -> None:
    tree = make_tree(0, block_size=4, rows=2)
    tree.append([5, 300, 7, 200])
    ids = tree.gist_token_ids(1, np.array([0]))[0].tolist()
    assert ids == [300, 200]
    assert torch.equal(tree.gist_embeds(1, np.array([0]))[0], tree.table(torch.tensor([300, 200])))


def test_mean_gist_is_the_mean_of_its_children() -> None:
    tree = make_tree(0, block_size=4, kind="mean")
    tree.append([1, 2, 3, 4])
    expected = tree.table(torch.tensor([1, 2, 3, 4])).mean(dim=0)
    torch.testing.assert_close(tree.gist_embeds(1, np.array([0]))[0, 0], expected)


@pytest.mark.parametrize("bad", [[-1], [VOCAB], [[1, 2]]])
def test_append_rejects_invalid_token_ids_without_changing_the_tree(bad: list[int]) -> None:
    tree = make_tree(10)
    with pytest.raises(ValueError, match="token_ids"):
        tree.append(bad)
    assert tree.lifetime == 10


@pytest.mark.parametrize("lifetime", [1_000, 40_000])
def test_tree_memory_is_linear_in_the_lifetime(lifetime: int) -> None:
    tree = make_tree(lifetime)
    row_bytes = tree.gist_rows * (8 + tree.table.hidden_size * tree.table.weight.element_size())
    needed = 4 * lifetime + row_bytes * sum(tree.node_count(k) for k in range(1, tree.levels + 1))
    assert needed <= tree.nbytes <= 2 * needed + 16 * 1024  # capacity doubling + small buffers
