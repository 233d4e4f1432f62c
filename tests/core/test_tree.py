from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lens_serve.core.checkpoint import config_json
from lens_serve.core.gist_kinds import GIST_KINDS, GistKind
from lens_serve.core.gistnet import (
    GistNetConfig,
    build_gistnet,
    gist_config,
    load_gistnet,
    save_gistnet,
)
from tests.core_helpers import (
    HIDDEN,
    LIST_SEPARATOR,
    VOCAB,
    list_table,
    make_tree,
    random_table,
)

SEPARATOR = 11  # stands for the tokenizer's ","


@settings(max_examples=25, deadline=None)
@given(
    chunks=st.lists(st.integers(0, 300), min_size=1, max_size=8),
    kind=st.sampled_from(GIST_KINDS),
    rows=st.sampled_from([1, 2]),
    separated=st.booleans(),
)
def test_incremental_tree_equals_tree_built_in_one_go(
    chunks: list[int], kind: GistKind, rows: int, separated: bool
) -> None:
    tokens = np.random.default_rng(sum(chunks)).integers(0, VOCAB, sum(chunks))
    separator = SEPARATOR if separated and rows == 2 and kind != "mean" else -1
    whole = make_tree(0, block_size=4, rows=rows, kind=kind, separator_id=separator)
    whole.append(tokens)
    pieces = make_tree(0, block_size=4, rows=rows, kind=kind, separator_id=separator)
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


def test_tokens_gist_with_a_separator_lists_keywords_then_separators() -> None:
    tree = make_tree(0, block_size=4, rows=4, separator_id=SEPARATOR)
    tree.append([5, 300, 7, 200] + [9, 8, 400, 6] + [3] * 8)  # 4 blocks -> one LOD2 gist
    lod1 = tree.gist_token_ids(1, np.arange(4)).tolist()
    assert lod1[:2] == [[300, 200, SEPARATOR, SEPARATOR], [9, 400, SEPARATOR, SEPARATOR]]
    expected = tree.table(torch.tensor([300, 200, SEPARATOR, SEPARATOR]))
    assert torch.equal(tree.gist_embeds(1, np.array([0]))[0], expected)
    # LOD2 picks its keywords among the children's keywords, never their separators
    assert tree.gist_token_ids(2, np.array([0]))[0].tolist() == [300, 400, SEPARATOR, SEPARATOR]


@pytest.mark.parametrize(
    ("kind", "rows", "separator"), [("tokens", 1, SEPARATOR), ("mean", 2, SEPARATOR)]
)
def test_a_separator_needs_two_rows_and_a_token_kind(
    kind: GistKind, rows: int, separator: int
) -> None:
    with pytest.raises(ValueError, match="separator_id"):
        GistNetConfig(kind, block_size=4, rows=rows, hidden_size=HIDDEN, separator_id=separator)


def test_a_separator_must_be_in_the_embedding_table() -> None:
    config = GistNetConfig(block_size=4, rows=2, hidden_size=HIDDEN, separator_id=VOCAB)
    with pytest.raises(ValueError, match="separator_id"):
        build_gistnet(config, random_table())
    with pytest.raises(ValueError, match="separator_id"):
        build_gistnet(config)


def test_gist_config_lays_tokens_gists_out_as_a_list_where_the_tokenizer_allows() -> None:
    table = list_table()
    marks = table.list_tokens
    assert marks is not None
    for rows in (1, 4):
        config = gist_config(table, rows=rows)
        assert config.separator_id == marks.separator and config.whole_words
        assert (config.frame_open, config.frame_close) == (marks.opener, marks.closer)
    trained = gist_config(table, "transformer", rows=4)
    assert trained.separator_id == marks.separator  # its `tokens` base, unframed
    assert not trained.whole_words and trained.frame_rows == 0
    assert gist_config(table, "transformer", rows=1).separator_id == -1
    assert gist_config(table, "mean", rows=4) == GistNetConfig("mean", rows=4, hidden_size=HIDDEN)
    assert gist_config(random_table(), rows=4) == GistNetConfig(rows=4, hidden_size=HIDDEN)
    listed = build_gistnet(gist_config(table, rows=4), table)
    plain = build_gistnet(GistNetConfig(rows=4, hidden_size=HIDDEN), table)
    assert listed.version != plain.version


def test_a_whole_words_gist_shows_the_separator_for_a_word_piece() -> None:
    tree = make_tree(0, block_size=4, rows=1, listed=True)
    # even ids begin words in list_table: block 0's top pick 301 is a piece, block 1's 400 a word
    tree.append([5, 301, 7, 200] + [9, 8, 400, 6] + [3] * 8)
    assert (
        tree.gist_token_ids(1, np.arange(4)).tolist()
        == [[LIST_SEPARATOR], [400]] + [[LIST_SEPARATOR]] * 2
    )
    assert tree.gist_token_ids(2, np.array([0])).tolist() == [[400]]  # never a child's separator


def test_whole_words_and_frames_are_for_tokens_gists_with_a_separator() -> None:
    with pytest.raises(ValueError, match="kind tokens"):
        GistNetConfig("transformer", rows=2, hidden_size=HIDDEN, separator_id=1, whole_words=True)
    with pytest.raises(ValueError, match="kind tokens"):
        GistNetConfig("mean", hidden_size=HIDDEN, frame_open=(1,))
    with pytest.raises(ValueError, match="separator_id"):
        GistNetConfig(hidden_size=HIDDEN, whole_words=True)


def test_config_fields_added_later_keep_earlier_versions_and_round_trip(tmp_path: Path) -> None:
    plain = GistNetConfig(rows=2, hidden_size=HIDDEN, separator_id=3)
    assert "whole_words" not in config_json(plain) and "frame_open" not in config_json(plain)
    table = list_table()
    listed = build_gistnet(gist_config(table, rows=2), table)
    assert '"frame_open": [' in config_json(listed.config)
    save_gistnet(listed, tmp_path)
    loaded = load_gistnet(tmp_path)
    assert loaded.config == listed.config and loaded.version == listed.version


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
