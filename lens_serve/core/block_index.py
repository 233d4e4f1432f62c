"""An inverted index of a lifetime's complete blocks: BM25 relevance of each block to a query (what
the `retrieval` policy and LensNet's prior rank), and the query match LensNet reads from it.

LensNet sees each unit as the mean of its rows' embeddings. A mean over 32+ tokens blurs a single
rare word away, so "which old span mentions what the newest tokens ask about" is not in its input.
The query match puts it there: for each unit, the IDF-weighted share of the query's distinct
tokens that occur in the unit's span. Document frequency counts blocks, so a word found everywhere
("the", "of") weighs almost nothing and a name asked about weighs most. LensNet then learns what to
do with a match, not how to find one, which a few hundred preference records can teach.

The index maps every token id to the sorted indices of the blocks that contain it, with the count
in each. It grows with the tree (amortised O(new tokens) per append, never rebuilt); a query match
costs O(Q * U * log) for Q distinct query tokens and U units, and BM25 O(sum of the query tokens'
block counts)."""

from __future__ import annotations

import numpy as np

# BM25's term-frequency saturation (the usual default). Every block holds B tokens, so BM25's
# length normalisation (its `b`) has nothing to normalise and is left out.
BM25_K1 = 1.2


class BlockIndex:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.blocks = 0  # complete blocks indexed
        self._postings: dict[int, np.ndarray] = {}  # token -> block ids (capacity-doubled buffer)
        self._counts: dict[int, np.ndarray] = {}  # token -> its count in each of those blocks
        self._sizes: dict[int, int] = {}  # token -> used length of its buffers
        self.nbytes = 0

    def add_blocks(self, blocks: np.ndarray) -> None:
        """blocks (N, B) token ids: the next N complete blocks of the lifetime."""
        n = blocks.shape[0]
        if n == 0:
            return
        local = np.arange(n, dtype=np.int64)[:, None]  # (N, 1)
        keys = np.sort((blocks.astype(np.int64) * n + local).ravel())  # (token, block), by token
        first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])  # distinct (np.unique: slower)
        counts = np.diff(np.r_[first, keys.size]).astype(np.uint16)  # occurrences in the block
        keys = keys[first]
        tokens, block_ids = keys // n, (keys % n + self.blocks).astype(np.int32)
        cuts = np.flatnonzero(np.diff(tokens)) + 1  # where the token changes
        bounds = np.r_[0, cuts, keys.size].tolist()
        for k, token in enumerate(tokens[bounds[:-1]].tolist()):
            lo, hi = bounds[k], bounds[k + 1]
            self._extend(token, block_ids[lo:hi], counts[lo:hi])
        self.blocks += n

    def _extend(self, token: int, ids: np.ndarray, counts: np.ndarray) -> None:
        used = self._sizes.get(token, 0)
        buf, tf = self._postings.get(token), self._counts.get(token)
        need = used + ids.size
        if buf is None or tf is None or need > buf.size:
            size = max(need, 2 * (0 if buf is None else buf.size), 4)
            grown, grown_tf = np.empty(size, dtype=np.int32), np.empty(size, dtype=np.uint16)
            if buf is not None and tf is not None:
                grown[:used], grown_tf[:used] = buf[:used], tf[:used]
                self.nbytes -= buf.nbytes + tf.nbytes
            self._postings[token], self._counts[token] = buf, tf = grown, grown_tf
            self.nbytes += grown.nbytes + grown_tf.nbytes
        buf[used:need], tf[used:need] = ids, counts
        self._sizes[token] = need

    def blocks_with(self, token: int) -> np.ndarray:
        """Sorted indices of the complete blocks that contain `token` (a view)."""
        buf = self._postings.get(token)
        return buf[: self._sizes[token]] if buf is not None else np.empty(0, dtype=np.int32)

    def bm25(self, query: np.ndarray) -> np.ndarray:
        """(blocks,) BM25 relevance of every complete block to `query` (token ids; a repeated
        query token counts once). 0 for a block that shares no informative token with it."""
        scores = np.zeros(self.blocks)
        for word in np.unique(query).tolist():
            used = self._sizes.get(word, 0)
            if used == 0:
                continue
            # Robertson-Sparck Jones IDF, floored at 0 so a token in most blocks adds nothing.
            idf = float(np.log((self.blocks - used + 0.5) / (used + 0.5)))
            if idf <= 0:
                continue
            tf = self._counts[word][:used].astype(np.float64)
            # Block ids in one posting list are distinct, so this fancy-index add is exact.
            scores[self._postings[word][:used]] += idf * tf * (BM25_K1 + 1) / (tf + BM25_K1)
        return scores

    def query_match(self, query: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """(U,) in [0, 1]: the IDF-weighted share of `query`'s distinct tokens in each span.

        Spans [starts, ends) are block-aligned units of complete blocks; a span past the indexed
        blocks (the trailing partial block) gets 0 here and is matched by the caller."""
        words = np.unique(query).tolist()
        found = np.zeros(len(starts))
        if not words or self.blocks == 0:
            return found
        first = starts // self.block_size  # (U,) first block of each span
        stop = -(-ends // self.block_size)  # (U,) one past its last block
        total = 0.0
        for word in words:
            blocks = self.blocks_with(word)
            idf = float(np.log((self.blocks + 1) / (blocks.size + 1)))  # 0: in every block
            total += idf
            if blocks.size == 0:
                continue
            at = np.searchsorted(blocks, first)  # (U,) first posting at or after each span
            inside = (at < blocks.size) & (blocks[np.minimum(at, blocks.size - 1)] < stop)
            found += idf * inside
        return found / total if total > 0 else found
