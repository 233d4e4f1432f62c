"""Assembly: a working context -> the embedding rows vLLM consumes (`prompt_embeds`)."""

from __future__ import annotations

import numpy as np
import torch

from lens_serve.context import WorkingContext
from lens_serve.tree import LifetimeTree


def assemble(tree: LifetimeTree, wc: WorkingContext) -> torch.Tensor:
    """(rows, D) in the table's dtype: token rows for LOD0 entries, gist rows for gists."""
    entry_rows = wc.entry_rows  # (E,)
    offsets = np.cumsum(entry_rows) - entry_rows  # (E,) first row of each entry
    out = torch.empty(int(entry_rows.sum()), tree.table.hidden_size, dtype=tree.table.dtype)
    raw = wc.lods == 0
    out[torch.from_numpy(offsets[raw])] = tree.token_embeds(wc.starts[raw])
    for lod in np.unique(wc.lods[~raw]).tolist():
        mask = wc.lods == lod
        rows = (offsets[mask, None] + np.arange(tree.gist_rows)).reshape(-1)  # (G * R,)
        gists = tree.gist_embeds(lod, wc.starts[mask] // tree.block_size**lod)  # (G, R, D)
        out[torch.from_numpy(rows)] = gists.reshape(-1, gists.shape[-1])
    return out


def shown_token_ids(tree: LifetimeTree, wc: WorkingContext) -> np.ndarray:
    """(rows,) the token id each row shows, -1 for soft gist rows (for logs and tests)."""
    entry_rows = wc.entry_rows
    offsets = np.cumsum(entry_rows) - entry_rows
    out = np.full(int(entry_rows.sum()), -1, dtype=np.int64)
    raw = wc.lods == 0
    out[offsets[raw]] = tree.tokens()[wc.starts[raw]]
    for lod in np.unique(wc.lods[~raw]).tolist():
        mask = wc.lods == lod
        rows = (offsets[mask, None] + np.arange(tree.gist_rows)).reshape(-1)
        ids = tree.gist_token_ids(lod, wc.starts[mask] // tree.block_size**lod)
        out[rows] = ids.reshape(-1).numpy()
    return out
