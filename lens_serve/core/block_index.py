"""An inverted index of a lifetime's complete blocks, and the query match LensNet reads from it.

LensNet sees each unit as the mean of its rows' embeddings. A mean over 32+ tokens blurs a single
rare word away, so "which old span mentions what the newest tokens ask about" is not in its input.
The query match puts it there: for each unit, the IDF-weighted share of the query's distinct
tokens that occur in the unit's span. Document frequency counts blocks, so a word found everywhere
("the", "of") weighs almost nothing and a name asked about weighs most. LensNet then learns what to
do with a match, not how to find one, which a few hundred preference records can teach.

The index maps every token id to the sorted indices of the blocks that contain it. It grows with
the tree (amortised O(new tokens) per append), and a query costs O(Q * U * log) for Q distinct
query tokens and U units, independent of the lifetime's length."""

from __future__ import annotations

import numpy as np


class BlockIndex:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.blocks = 0  # complete blocks indexed
        self._postings: dict[int, np.ndarray] = {}  # token -> block ids (capacity-doubled buffer)
        self._sizes: dict[int, int] = {}  # token -> used length of its buffer
        self.nbytes = 0

    def add_blocks(self, blocks: np.ndarray) -> None:
        """blocks (N, B) token ids: the next N complete blocks of the lifetime."""
        n = blocks.shape[0]
        if n == 0:
            return
        local = np.arange(n, dtype=np.int64)[:, None]  # (N, 1)
        keys = np.sort((blocks.astype(np.int64) * n + local).ravel())  # (token, block), by token
        keys = keys[np.r_[True, keys[1:] != keys[:-1]]]  # distinct (np.unique hashes: slower)
        tokens, block_ids = keys // n, (keys % n + self.blocks).astype(np.int32)
        cuts = np.flatnonzero(np.diff(tokens)) + 1  # where the token changes
        bounds = np.r_[0, cuts, keys.size].tolist()
        for k, token in enumerate(tokens[bounds[:-1]].tolist()):
            self._extend(token, block_ids[bounds[k] : bounds[k + 1]])
        self.blocks += n

    def _extend(self, token: int, ids: np.ndarray) -> None:
        used = self._sizes.get(token, 0)
        buf = self._postings.get(token)
        need = used + ids.size
        if buf is None or need > buf.size:
            grown = np.empty(max(need, 2 * (0 if buf is None else buf.size), 4), dtype=np.int32)
            if buf is not None:
                grown[:used] = buf[:used]
                self.nbytes -= buf.nbytes
            self._postings[token] = buf = grown
            self.nbytes += grown.nbytes
        buf[used:need] = ids
        self._sizes[token] = need

    def blocks_with(self, token: int) -> np.ndarray:
        """Sorted indices of the complete blocks that contain `token` (a view)."""
        buf = self._postings.get(token)
        return buf[: self._sizes[token]] if buf is not None else np.empty(0, dtype=np.int32)

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
