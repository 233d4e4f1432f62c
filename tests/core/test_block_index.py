from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lens_serve.core.block_index import BlockIndex
from lens_serve.core.context import coarsest_tiling, fill_newest_first
from lens_serve.core.lensnet import QUERY_TOKENS, unit_inputs
from tests.core_helpers import make_tree

B = 4


def brute_match(tokens: np.ndarray, query: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """The definition, spelled out: IDF over complete blocks, share of query words per span."""
    blocks = [set(tokens[i : i + B].tolist()) for i in range(0, len(tokens) - B + 1, B)]
    words = sorted(set(query.tolist()))
    idf = {w: math.log((len(blocks) + 1) / (sum(w in s for s in blocks) + 1)) for w in words}
    total = sum(idf.values())
    if total == 0:  # every query word is in every block: nothing discriminates
        return np.zeros(len(spans))
    return np.array(
        [sum(idf[w] for w in set(tokens[a:b].tolist()) & set(words)) / total for a, b in spans]
    )


def index_in_chunks(
    rng: np.random.Generator, chunks: list[int], vocab: int
) -> tuple[np.ndarray, BlockIndex]:
    """Random tokens of sum(chunks) + 1 blocks, indexed in appends of `chunks` blocks (and 1)."""
    n_blocks = sum(chunks) + 1
    tokens = rng.integers(0, vocab, n_blocks * B)
    index = BlockIndex(B)
    at = 0
    for size in [*chunks, 1]:
        index.add_blocks(tokens[at * B : (at + size) * B].reshape(-1, B))
        at += size
    assert index.blocks == n_blocks
    return tokens, index


@settings(max_examples=40, deadline=None)
@given(
    chunks=st.lists(st.integers(0, 12), min_size=1, max_size=6),
    vocab=st.integers(2, 30),
    seed=st.integers(0, 1000),
)
def test_match_equals_the_definition_however_the_blocks_arrive(
    chunks: list[int], vocab: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    tokens, index = index_in_chunks(rng, chunks, vocab)
    n_blocks = index.blocks
    cuts = sorted({0, n_blocks, *rng.integers(0, n_blocks, 3).tolist()})
    starts, ends = np.array(cuts[:-1]) * B, np.array(cuts[1:]) * B
    query = tokens[-6:]
    got = index.query_match(query, starts, ends)
    assert np.allclose(got, brute_match(tokens, query, list(zip(starts, ends, strict=True))))


def test_a_rare_asked_word_outweighs_words_found_everywhere() -> None:
    index = BlockIndex(B)
    common, rare = 1, 99
    blocks = np.full((8, B), common)
    blocks[5, 2] = rare  # the one block that mentions the rare word
    index.add_blocks(blocks)
    match = index.query_match(np.array([common, rare]), np.arange(8) * B, np.arange(1, 9) * B)
    assert match[5] == 1.0 and match.argmax() == 5
    # `common` is in every block: it weighs nothing, so no other block matches at all.
    assert np.all(np.delete(match, 5) == 0.0)


def test_lensnet_inputs_carry_the_match_of_each_unit() -> None:
    tree = make_tree(0, block_size=B, rows=1, kind="tokens")
    tokens = np.random.default_rng(3).integers(0, 64, 10 * B * B + 3)  # ends in a partial block
    tree.append(tokens)
    tiling = fill_newest_first(coarsest_tiling(tree.lifetime, 2 * B, tree.levels, B, 1), 40)
    inputs = unit_inputs(tree, tiling, 2 * B)
    match = inputs.features[:, -1].numpy()
    spans = [tiling.unit_span(u) for u in tiling.units]
    query = tokens[-QUERY_TOKENS:]  # the newest tokens, not the whole tail
    assert np.allclose(match[:-1], brute_match(tokens, query, spans), atol=1e-6)
    assert match[-1] == 1.0  # the partial block is part of the query


def brute_bm25(tokens: np.ndarray, query: np.ndarray) -> np.ndarray:
    """BM25 spelled out over the complete blocks (k1 = 1.2, RSJ IDF floored at 0)."""
    blocks = [tokens[i : i + B].tolist() for i in range(0, len(tokens) - B + 1, B)]
    n = len(blocks)
    out = np.zeros(n)
    for word in set(query.tolist()):
        df = sum(word in block for block in blocks)
        idf = max(math.log((n - df + 0.5) / (df + 0.5)), 0.0) if df else 0.0
        for i, block in enumerate(blocks):
            tf = block.count(word)
            out[i] += idf * tf * 2.2 / (tf + 1.2)
    return out


@settings(max_examples=40, deadline=None)
@given(
    chunks=st.lists(st.integers(0, 12), min_size=1, max_size=6),
    vocab=st.integers(2, 40),
    seed=st.integers(0, 1000),
)
def test_bm25_equals_the_definition_however_the_blocks_arrive(
    chunks: list[int], vocab: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    tokens, index = index_in_chunks(rng, chunks, vocab)
    query = np.concatenate([tokens[-5:], rng.integers(0, vocab, 3)])
    np.testing.assert_allclose(index.bm25(query), brute_bm25(tokens, query), rtol=1e-9)


def test_bm25_ranks_the_block_with_the_rare_word_first_and_counts_repeats() -> None:
    index = BlockIndex(B)
    common, rare = 1, 7
    blocks = np.full((20, B), common)
    blocks[5, 0] = rare
    blocks[12, :2] = rare  # twice: a higher term frequency
    index.add_blocks(blocks)
    scores = index.bm25(np.array([common, rare, rare]))  # a repeated query word counts once
    assert int(np.argmax(scores)) == 12 and scores[5] > 0
    assert np.count_nonzero(scores) == 2  # `common` is in every block: it adds nothing
