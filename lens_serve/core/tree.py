"""The lifetime tree: every token of a session and a gist for every complete block at every level.

Node (k, i) covers tokens [i * B**k, (i + 1) * B**k). Level 0 is the tokens themselves; level k >= 1
holds one gist (`rows` rows) per complete group of B level-(k-1) nodes. Appends are incremental:
only new complete groups are gisted, in batches, so appending n tokens costs O(n) amortised and the
tree's memory is O(lifetime). A level exists as soon as it has one node, so the coarsest tiling of
any lifetime stays small (see `context.coarsest_rows`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lens_serve.core.block_index import BlockIndex
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.gistnet import GistNet, Gists

# Blocks gisted per GistNet call: bounds peak memory of one call (~40 MB of bf16 children at
# D = 576) while keeping calls large enough to amortise Python overhead.
_GIST_BATCH = 1024


class _GrowingTensor:
    """A tensor that grows along dim 0 with capacity doubling (amortised O(1) per row)."""

    def __init__(self, row_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._buf = torch.empty((16, *row_shape), dtype=dtype)
        self.length = 0

    def extend(self, rows: torch.Tensor) -> None:
        need = self.length + rows.shape[0]
        if need > self._buf.shape[0]:
            bigger = torch.empty((max(need, 2 * self._buf.shape[0]), *self._buf.shape[1:]))
            bigger = bigger.to(self._buf.dtype)
            bigger[: self.length] = self._buf[: self.length]
            self._buf = bigger
        self._buf[self.length : need] = rows
        self.length = need

    @property
    def data(self) -> torch.Tensor:
        return self._buf[: self.length]

    @property
    def nbytes(self) -> int:
        return self._buf.element_size() * self._buf.nelement()


class _GistLevel:
    def __init__(self, rows: int, hidden: int, dtype: torch.dtype) -> None:
        self.token_ids = _GrowingTensor((rows,), torch.long)  # (n_k, R)
        self.embeds = _GrowingTensor((rows, hidden), dtype)  # (n_k, R, D)

    @property
    def count(self) -> int:
        return self.token_ids.length


class LifetimeTree:
    def __init__(self, gistnet: GistNet, table: EmbeddingTable) -> None:
        if gistnet.config.hidden_size != table.hidden_size:
            raise ValueError(
                f"GistNet hidden_size {gistnet.config.hidden_size} != "
                f"embedding width {table.hidden_size}"
            )
        self.gistnet = gistnet
        self.gistnet_version = gistnet.version
        self.table = table
        self.block_size = gistnet.config.block_size
        self.gist_rows = gistnet.config.rows
        self.frame_rows = gistnet.config.frame_rows
        self._tokens = np.empty(1024, dtype=np.int32)
        self._length = 0
        self._levels: list[_GistLevel] = []  # index k - 1 holds level k
        self.index = BlockIndex(self.block_size)  # token -> blocks holding it (LensNet's match)

    # -- growth ---------------------------------------------------------------------------------

    def append(self, token_ids: Sequence[int] | np.ndarray) -> None:
        new = np.asarray(token_ids, dtype=np.int64)
        if new.ndim != 1:
            raise ValueError(f"token_ids must be 1-D, got shape {new.shape}")
        if new.size and (new.min() < 0 or new.max() >= self.table.vocab_size):
            raise ValueError(f"token_ids must lie in [0, {self.table.vocab_size})")
        need = self._length + new.size
        if need > self._tokens.size:
            grown = np.empty(max(need, 2 * self._tokens.size), dtype=np.int32)
            grown[: self._length] = self._tokens[: self._length]
            self._tokens = grown
        self._tokens[self._length : need] = new
        self._length = need
        b, indexed = self.block_size, self.index.blocks
        complete = need // b
        self.index.add_blocks(self._tokens[indexed * b : complete * b].reshape(-1, b))
        self._grow_levels()

    def _grow_levels(self) -> None:
        b = self.block_size
        level = 1
        while True:
            children = self._length if level == 1 else self._levels[level - 2].count
            complete = children // b
            if complete == 0:
                return
            if len(self._levels) < level:
                self._levels.append(
                    _GistLevel(self.gist_rows, self.table.hidden_size, self.table.dtype)
                )
            target = self._levels[level - 1]
            for start in range(target.count, complete, _GIST_BATCH):
                stop = min(start + _GIST_BATCH, complete)
                with torch.inference_mode():
                    gists = self._gist(level, start, stop)
                target.token_ids.extend(gists.token_ids)
                target.embeds.extend(gists.embeds)
            level += 1

    def _gist(self, level: int, start: int, stop: int) -> Gists:
        """Gists of nodes [start, stop) at `level` from their children."""
        b, n = self.block_size, stop - start
        if level == 1:
            ids = torch.from_numpy(self._tokens[start * b : stop * b].astype(np.int64))
            return self.gistnet.from_tokens(ids.view(n, b), self.table)  # blocks (N, B)
        below = self._levels[level - 2]
        ids = below.token_ids.data[start * b : stop * b].reshape(n, -1)  # (N, B*R)
        embeds = below.embeds.data[start * b : stop * b]  # (N*B, R, D)
        gists: Gists = self.gistnet(ids, embeds.reshape(n, b * self.gist_rows, -1))  # (N, B*R, D)
        return gists

    # -- queries --------------------------------------------------------------------------------

    @property
    def lifetime(self) -> int:
        return self._length

    @property
    def levels(self) -> int:
        """The highest level that has at least one node (0: tokens only)."""
        return len(self._levels)

    def node_count(self, level: int) -> int:
        if level == 0:
            return self._length
        return self._levels[level - 1].count if level <= len(self._levels) else 0

    def tokens(self, start: int = 0, end: int | None = None) -> np.ndarray:
        stop = self._length if end is None else end
        return self._tokens[start:stop]

    def token_embeds(self, positions: np.ndarray) -> torch.Tensor:
        """(P,) token positions -> (P, D)."""
        return self.table(torch.from_numpy(self._tokens[positions].astype(np.int64)))

    def gist_embeds(self, level: int, index: np.ndarray) -> torch.Tensor:
        """(G,) node indices at `level` >= 1 -> (G, R, D)."""
        return self._levels[level - 1].embeds.data[torch.from_numpy(index.astype(np.int64))]

    def gist_token_ids(self, level: int, index: np.ndarray) -> torch.Tensor:
        """(G,) node indices -> (G, R) shown token ids (-1 for soft rows)."""
        return self._levels[level - 1].token_ids.data[torch.from_numpy(index.astype(np.int64))]

    @property
    def nbytes(self) -> int:
        """Memory held by this tree (tokens + gists), for the server's byte-bounded cache."""
        gists = sum(lv.token_ids.nbytes + lv.embeds.nbytes for lv in self._levels)
        return int(self._tokens.nbytes) + gists + self.index.nbytes
