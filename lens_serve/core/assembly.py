"""Assembly: a working context -> the embedding rows vLLM consumes (`prompt_embeds`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from lens_serve.core.context import WorkingContext
from lens_serve.core.tree import LifetimeTree


class Layout(NamedTuple):
    offsets: np.ndarray  # (E,) first row of each entry
    rows: int  # wc.rows
    frame_open: int | None  # first row of the frame's opening tokens; None: no frame
    frame_close: int | None  # first row of its closing tokens


def layout(tree: LifetimeTree, wc: WorkingContext) -> Layout:
    """Where each entry goes; the GistNet's frame (if any) opens before the first gist and closes
    after the last."""
    entry_rows = wc.entry_rows  # (E,)
    offsets = np.cumsum(entry_rows) - entry_rows
    config = tree.gistnet.config
    gists = np.flatnonzero(wc.lods > 0)
    if not config.frame_rows or not len(gists):
        return Layout(offsets, int(entry_rows.sum()), None, None)
    first, last = int(gists[0]), int(gists[-1])
    offsets[first:] += len(config.frame_open)
    closer = int(offsets[last]) + tree.gist_rows
    offsets[last + 1 :] += len(config.frame_close)
    opener = int(offsets[first]) - len(config.frame_open)
    return Layout(offsets, int(entry_rows.sum()) + config.frame_rows, opener, closer)


def assemble(tree: LifetimeTree, wc: WorkingContext) -> torch.Tensor:
    """(rows, D) in the table's dtype: token rows for LOD0 entries, gist rows for gists, and the
    frame's token rows."""
    where = layout(tree, wc)
    out = torch.empty(where.rows, tree.table.hidden_size, dtype=tree.table.dtype)
    raw = wc.lods == 0
    out[torch.from_numpy(where.offsets[raw])] = tree.token_embeds(wc.starts[raw])
    for lod in np.unique(wc.lods[~raw]).tolist():
        mask = wc.lods == lod
        rows = (where.offsets[mask, None] + np.arange(tree.gist_rows)).reshape(-1)  # (G * R,)
        gists = tree.gist_embeds(lod, wc.starts[mask] // tree.block_size**lod)  # (G, R, D)
        out[torch.from_numpy(rows)] = gists.reshape(-1, gists.shape[-1])
    for first, ids in _frame(tree, where):
        out[first : first + len(ids)] = tree.table(torch.tensor(ids))
    return out


def shown_token_ids(tree: LifetimeTree, wc: WorkingContext) -> np.ndarray:
    """(rows,) the token id each row shows, -1 for soft gist rows (for logs and tests)."""
    where = layout(tree, wc)
    out = np.full(where.rows, -1, dtype=np.int64)
    raw = wc.lods == 0
    out[where.offsets[raw]] = tree.tokens()[wc.starts[raw]]
    for lod in np.unique(wc.lods[~raw]).tolist():
        mask = wc.lods == lod
        rows = (where.offsets[mask, None] + np.arange(tree.gist_rows)).reshape(-1)
        ids = tree.gist_token_ids(lod, wc.starts[mask] // tree.block_size**lod)
        out[rows] = ids.reshape(-1).numpy()
    for first, frame_ids in _frame(tree, where):
        out[first : first + len(frame_ids)] = frame_ids
    return out


def _frame(tree: LifetimeTree, where: Layout) -> list[tuple[int, tuple[int, ...]]]:
    """(first row, token ids) of the frame's two parts; none when nothing is framed."""
    if where.frame_open is None or where.frame_close is None:
        return []
    config = tree.gistnet.config
    return [(where.frame_open, config.frame_open), (where.frame_close, config.frame_close)]
